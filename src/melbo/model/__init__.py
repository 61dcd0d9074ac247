"""Model access: loading any causal LM (and the embedded SmolLM2), finding its layers, hooks on the residual
stream, prompts, and the forward passes that steer."""
