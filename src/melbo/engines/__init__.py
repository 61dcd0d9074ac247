"""The engines that find vectors: MELBO discovery and MELBO-ortho, their settings, their optimisers, and the
block driver they share (checkpoint after every block, resume)."""
