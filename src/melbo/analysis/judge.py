"""The concept judge: every completion of an eval rated by an OpenAI-compatible chat model, AxBench-style.

Per completion and concept, three ratings of 0, 1 or 2: **concept** (is the concept there?), **instruction** (does it
relate to the prompt?) and **fluency**; their harmonic mean is the completion's score (0 when any rating is 0). The
prompts and the presets for the post's four behaviours (``code``, ``alien``, ``stem-problem``, ``jailbreak``) live in
``melbo/data/judge.json``. Scores are only as good as the judge.

Requests go to the URL given and nowhere else (``http`` or ``https`` only), with the key read from an environment
variable at request time (never stored or printed); they run concurrently up to a limit, each with a timeout, retried
with exponential backoff on 429, 5xx and connection errors. Every rating is cached in eval.json under ``judge`` by
(template version, judge model, kind, concept text, prompt, completion): a second call sends no request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from melbo.errors import MelboError
from melbo.output.live import status_unless_given

if TYPE_CHECKING:
    from melbo.analysis.evaluate import EvalResults

KINDS = ("concept", "instruction", "fluency")
LABEL_OF_CONCEPT = {"code": "code", "jailbreak": "compliance"}  # presets that one of melbo's regex labels also reads
LOW_AGREEMENT = 0.8  # below this agreement with the regex label, melbo judge says to read the judge's answers
NONSENSE_LIMIT = 8  # this many answers in a row without a rating: the judge is not following the template


_DATA: dict[str, Any] = json.loads(resources.files("melbo").joinpath("data/judge.json").read_text(encoding="utf-8"))
TEMPLATE_VERSION: str = _DATA["version"]
PRESETS: dict[str, str] = _DATA["concepts"]
TEMPLATES: dict[str, str] = _DATA["templates"]  # kind → the prompt asking for that rating


@dataclass
class JudgeConfig:
    """Where the judge is and how to ask it (``melbo judge``, ``melbo eval --judge``, a study's ``[eval] judge``)."""

    url: str = ""  # an OpenAI-compatible endpoint: its base (…/v1) or its chat-completions URL
    model: str | None = None  # the judge model; None: the first the endpoint lists at /models
    concepts: list[str] = field(default_factory=lambda: ["code"])  # preset names, or "name: description"
    concepts_file: str | None = None  # TOML or JSON: [{name, description}, …] or {name: description}
    key_env: str = "OPENAI_API_KEY"  # the environment variable holding the API key (may be unset for local servers)
    concurrency: int = 8
    # seconds per request, as the openai client's: a judge on CPUs answers its requests together (Qwen2.5 0.5B behind
    # melbo serve on 2 cores: 8 answers of up to 256 tokens in about 36 s, over 60 s while other work shared the cores)
    timeout: float = 600.0
    retries: int = 4  # more tries after a 429, a 5xx or a connection error
    backoff: float = 1.0  # seconds before the first retry; doubled each time (a Retry-After header is obeyed, ≤ 30 s)
    max_tokens: int = 256  # the judge's answer: a short explanation, then "Rating: [[n]]" (melbo serve allows 256)

    @classmethod
    def from_options(cls, url: str | None, model: str | None, concept: list[str] | None, concepts: str | Path | None, key_env: str,
                     concurrency: int, timeout: float) -> JudgeConfig | None:
        """The settings of ``--judge URL`` and its companions (checked); None without ``--judge``."""
        if url is None:
            if concept or concepts or model:
                raise MelboError("--concept, --concepts and --judge-model go with --judge URL")
            return None
        cfg = cls(url=url, model=model, concepts=list(concept) if concept else ([] if concepts else list(cls().concepts)),
                  concepts_file=str(concepts) if concepts else None, key_env=key_env, concurrency=concurrency, timeout=timeout)
        cfg.check()
        return cfg

    def check(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise MelboError(f"--judge {self.url!r}: give an http:// or https:// URL of an OpenAI-compatible endpoint")
        if self.concurrency < 1 or self.retries < 0 or not self.timeout > 0 or self.backoff < 0:
            raise MelboError("--judge-concurrency must be at least 1 and --judge-timeout positive (retries and backoff ≥ 0)")
        self.concept_texts()

    def concept_texts(self) -> dict[str, str]:
        """name → description, from the presets, ``name: description`` items and the concepts file."""
        out: dict[str, str] = {}
        for item in self.concepts:
            if item in PRESETS:
                out[item] = PRESETS[item]
            elif ":" in item and item.split(":", 1)[0].strip() and item.split(":", 1)[1].strip():
                name, text = item.split(":", 1)
                out[name.strip()] = text.strip()
            else:
                raise MelboError(f"--concept {item!r}: use a preset ({', '.join(PRESETS)}) or 'name: description'")
        if self.concepts_file:
            out.update(read_concepts(Path(self.concepts_file)))
        if not out:
            raise MelboError("the judge needs at least one concept: --concept code, or --concepts FILE")
        return out

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc


def read_concepts(path: Path) -> dict[str, str]:
    """Concepts from a TOML or JSON file: a list of ``{name, description}`` or a table ``name = description``."""
    if not path.is_file():
        raise MelboError(f"--concepts {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MelboError(f"--concepts {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({exc})") from exc
    items = data.get("concepts", data) if isinstance(data, dict) else data
    if isinstance(items, dict):
        items = [{"name": k, "description": v} for k, v in items.items()]
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) and isinstance(i.get("description"), str) for i in items):
        raise MelboError(f"--concepts {path}: give a list of {{name, description}} or name = \"description\" pairs")
    return {i["name"]: i["description"] for i in items}


_RATING = re.compile(r"Rating:\s*\[\[\s*([0-2])\s*\]\]", re.IGNORECASE)
_LOOSE = re.compile(r"Rating:\s*\**\s*\[?\[?\s*([0-2])\b", re.IGNORECASE)


def parse_rating(answer: str | None) -> int | None:
    """The rating at the end of a judge's answer ("Rating: [[2]]"; the last one wins); None when there is none."""
    if not answer:
        return None
    found = _RATING.findall(answer) or _LOOSE.findall(answer)
    return int(found[-1]) if found else None


def harmonic(ratings: list[int | None]) -> float | None:
    """The harmonic mean of the three ratings: 0 when one is 0, None when one is missing."""
    if any(r is None for r in ratings):
        return None
    values = [float(r) for r in ratings if r is not None]
    return 0.0 if min(values) == 0 else len(values) / sum(1 / v for v in values)


def rating_key(model: str, kind: str, concept: str, instruction: str, completion: str) -> str:
    """The cache key of one rating."""
    parts = [TEMPLATE_VERSION, model, kind, concept if kind == "concept" else "", instruction if kind == "instruction" else "", completion]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


def judge_prompt(kind: str, concept: str, instruction: str, completion: str) -> str:
    return TEMPLATES[kind].replace("{concept}", concept).replace("{instruction}", instruction).replace("{completion}", completion)


class JudgeError(MelboError):
    """The judge cannot be reached, refuses, or answers without ratings."""


class JudgeClient:
    """Chat-completion requests to one OpenAI-compatible endpoint, with timeouts and retries with backoff."""

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        base = cfg.url.rstrip("/")
        self.chat_url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.models_url = self.chat_url.rsplit("/chat/completions", 1)[0] + "/models"
        self.requests = 0
        self._lock = threading.Lock()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _call(self, url: str, body: dict[str, Any] | None) -> Any:
        """One request with retries; the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.cfg.retries + 1):
            with self._lock:
                self.requests += 1
            request = urllib.request.Request(url, data=data, headers=self._headers(), method="GET" if body is None else "POST")
            wait = self.cfg.backoff * 2**attempt
            try:
                with urllib.request.urlopen(request, timeout=self.cfg.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(f"the judge at {self.cfg.host} answered {exc.code} {exc.reason}: {_detail(exc)}") from None
                last = f"{exc.code} {exc.reason}"
                after = exc.headers.get("Retry-After") if exc.headers else None
                if after and after.strip().replace(".", "", 1).isdigit():
                    wait = min(30.0, float(after))
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last = str(getattr(exc, "reason", exc)) or type(exc).__name__
            except ValueError:
                return None  # not JSON: a nonsense answer, counted as such by the caller
            if attempt < self.cfg.retries:
                time.sleep(wait)
        raise JudgeError(f"cannot get an answer from the judge at {self.cfg.host} after {self.cfg.retries + 1} tries (last: {last})")

    def model(self) -> str:
        """The configured judge model, else the first the endpoint lists."""
        if self.cfg.model:
            return self.cfg.model
        listed = self._call(self.models_url, None)
        try:
            return str(listed["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise JudgeError(f"the judge at {self.cfg.host} lists no model at /models: give --judge-model") from None

    def ask(self, model: str, prompt: str) -> str | None:
        """The judge's answer text, or None when the response has no message."""
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": self.cfg.max_tokens}
        answer = self._call(self.chat_url, body)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " ".join(text.split())[:200]


@dataclass
class Rating:
    rating: int | None  # 0–2, or None when the answer held no rating
    raw: str  # the judge's answer as it came

    def to_json(self) -> dict[str, Any]:
        return {"rating": self.rating, "raw": self.raw}


@dataclass
class Item:
    """One completion to judge: where it comes from and its text."""

    prompt: str
    text: str
    source: str  # "copies" (the eval's completions) or a control's name
    index: int  # the vector's index in the run, or the control's row
    mode: str
    sample: int = 0


def judge_items(cfg: JudgeConfig, items: list[Item], cache: dict[str, Rating],
                on_progress: Callable[[int, int], None] | None = None) -> tuple[str, int]:
    """Fill ``cache`` with every rating ``items`` need for every concept; returns (judge model, requests sent).

    Raises :class:`JudgeError` when the judge cannot be reached or answers :data:`NONSENSE_LIMIT` times in a row
    without a rating (the ratings already in ``cache`` are complete and may be saved)."""
    client = JudgeClient(cfg)
    model = client.model()
    concepts = cfg.concept_texts()
    todo: dict[str, str] = {}
    for item in items:
        for kind in KINDS:
            for concept in (concepts.values() if kind == "concept" else [""]):
                key = rating_key(model, kind, concept, item.prompt, item.text)
                if key not in cache:
                    todo[key] = judge_prompt(kind, concept, item.prompt, item.text)
    nonsense = [0]
    lock = threading.Lock()
    done = [0]
    failed: list[JudgeError] = []

    def one(key: str) -> None:
        with lock:
            if nonsense[0] >= NONSENSE_LIMIT or failed:
                return  # stop asking: the judge is down or not following the template
        try:
            answer = client.ask(model, todo[key])
        except JudgeError as exc:
            with lock:
                failed.append(exc)
            return
        rating = parse_rating(answer)
        with lock:
            cache[key] = Rating(rating, answer or "")
            nonsense[0] = 0 if rating is not None else nonsense[0] + 1
            done[0] += 1
            if on_progress:
                on_progress(done[0], len(todo))

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        for future in [pool.submit(one, key) for key in todo]:
            future.result()
    if failed:
        raise failed[0]
    if nonsense[0] >= NONSENSE_LIMIT:
        raise JudgeError(f"the judge at {cfg.host} answered {NONSENSE_LIMIT} times in a row without a rating in the form "
                         "'Rating: [[n]]': is --judge-model a chat model that follows instructions?")
    return model, client.requests


@dataclass
class Score:
    """The three ratings of one completion on one concept, and their harmonic mean."""

    concept: int | None
    instruction: int | None
    fluency: int | None

    @property
    def harmonic(self) -> float | None:
        return harmonic([self.concept, self.instruction, self.fluency])

    def to_json(self) -> dict[str, Any]:
        return {"concept": self.concept, "instruction": self.instruction, "fluency": self.fluency, "harmonic": self.harmonic}


def score_of(cache: dict[str, Rating], model: str, concept: str, item: Item) -> Score:
    def get(kind: str) -> int | None:
        rating = cache.get(rating_key(model, kind, concept, item.prompt, item.text))
        return rating.rating if rating else None

    return Score(get("concept"), get("instruction"), get("fluency"))


@dataclass
class Scored:
    """One judged completion: where it comes from and its score on one concept."""

    item: Item
    score: Score

    def to_json(self) -> dict[str, Any]:
        i = self.item
        return {"source": i.source, "prompt": i.prompt, "mode": i.mode, "index": i.index, "sample": i.sample, **self.score.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any], texts: dict[tuple[str, str, str, int, int], str]) -> Scored:
        where = (data["source"], data["prompt"], data["mode"], int(data["index"]), int(data.get("sample", 0)))
        item = Item(where[1], texts.get(where, ""), where[0], where[3], where[2], where[4])
        return cls(item, Score(data["concept"], data["instruction"], data["fluency"]))


@dataclass
class ConceptSummary:
    """What the judge says of one concept over a run."""

    description: str
    share_concept_2: float | None  # copies (the base left out) rated 2 on the concept, on the run's prompt
    mean_harmonic: dict[str, float]  # per source (copies, each control): mean harmonic score on the run's prompt
    unrated: int  # ratings missing or unparsed
    label_agreement: float | None  # copies on which "rated 2" agrees with melbo's regex label (code, jailbreak)
    # of those compared: rated 2 where the regex label does not read the concept, and read by it but rated below 2
    # (None in summaries stored before they were counted)
    judge_only: int | None = None
    regex_only: int | None = None
    compared: int | None = None

    def disagreement(self, regex_label: str) -> str:
        """"rated 2 where melbo's regex label is not 'code': 66 of 173; …" ("" where not counted)."""
        if self.compared is None or self.judge_only is None or self.regex_only is None:
            return ""
        return (f"rated 2 where melbo's regex label is not {regex_label!r}: {self.judge_only} of {self.compared}; "
                f"labelled {regex_label!r} but rated below 2: {self.regex_only}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JudgeResults:
    """What eval.json holds under ``judge``: who judged, every rating (the cache), every score and the summary."""

    host: str
    model: str
    template: str
    concepts: dict[str, str]
    ratings: dict[str, Rating] = field(default_factory=dict)
    scores: dict[str, list[Scored]] = field(default_factory=dict)  # concept → every judged completion
    summary: dict[str, ConceptSummary] = field(default_factory=dict)
    requests_last_call: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host, "model": self.model, "template": self.template, "concepts": self.concepts,
            "ratings": {k: r.to_json() for k, r in self.ratings.items()},
            "scores": {c: [s.to_json() for s in scored] for c, scored in self.scores.items()},
            "summary": {c: s.to_json() for c, s in self.summary.items()}, "requests_last_call": self.requests_last_call,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JudgeResults:
        return cls(
            data["host"], data["model"], data["template"], dict(data.get("concepts", {})),
            {k: Rating(v["rating"], v["raw"]) for k, v in data.get("ratings", {}).items()},
            {c: [Scored.from_json(s, {}) for s in scored] for c, scored in data.get("scores", {}).items()},
            {c: ConceptSummary(**s) for c, s in data.get("summary", {}).items()}, int(data.get("requests_last_call", 0)),
        )

    def of_copies(self) -> dict[tuple[str, str, int, int], dict[str, Score]]:
        """The eval's own completions' scores, by (prompt, mode, vector index, sample), then by concept."""
        out: dict[tuple[str, str, int, int], dict[str, Score]] = {}
        for name, scored in self.scores.items():
            for s in scored:
                if s.item.source == "copies":
                    out.setdefault((s.item.prompt, s.item.mode, s.item.index, s.item.sample), {})[name] = s.score
        return out

    def answer(self, kind: str, concept: str, prompt: str, completion: str) -> str | None:
        """The judge's own words for one rating (None where it was not asked, or asked with another template)."""
        if self.template != TEMPLATE_VERSION or concept not in self.concepts:
            return None
        rating = self.ratings.get(rating_key(self.model, kind, self.concepts[concept], prompt, completion))
        return rating.raw if rating else None

    def rated_2_per_hundred(self, concept: str, run_prompt: str, base: int | None) -> list[tuple[int, float]]:
        """Share of vectors whose (first) completion on the run's prompt is rated 2 on ``concept``, per hundred vectors."""
        rows = [s for s in self.scores.get(concept, []) if s.item.source == "copies" and s.item.prompt == run_prompt and s.item.sample == 0]
        modes = {s.item.mode for s in rows}
        mode = "greedy" if "greedy" in modes else next(iter(sorted(modes)), None)
        blocks: dict[int, list[bool]] = {}
        for s in rows:
            if s.item.mode == mode and s.item.index != base and s.score.concept is not None:
                blocks.setdefault(s.item.index // 100, []).append(s.score.concept == 2)
        return [(b * 100, sum(v) / len(v)) for b, v in sorted(blocks.items())]


def summarise(cache: dict[str, Rating], model: str, concepts: dict[str, str], scored: dict[str, list[Scored]], run_prompt: str,
              base_index: int | None, labels: dict[tuple[str, str, int], str]) -> dict[str, ConceptSummary]:
    """Per concept: the share of copies rated 2 on the concept (run's prompt), the mean harmonic score per source
    (copies and each control), the unparsed ratings, and the agreement with melbo's regex label where one reads it."""
    out: dict[str, ConceptSummary] = {}
    for name, text in concepts.items():
        scores = scored[name]
        copies = [s.score for s in scores if s.item.source == "copies" and s.item.prompt == run_prompt and s.item.index != base_index]
        rated = [s.concept for s in copies if s.concept is not None]
        by_source: dict[str, list[float]] = {}
        for s in scores:
            h = s.score.harmonic
            if s.item.prompt == run_prompt and not (s.item.source == "copies" and s.item.index == base_index) and h is not None:
                by_source.setdefault(s.item.source, []).append(h)
        pairs: list[tuple[bool, bool]] = []  # (rated 2, the regex label reads the concept)
        if name in LABEL_OF_CONCEPT:
            pairs = [(s.score.concept == 2, labels[(s.item.prompt, s.item.mode, s.item.index)] == LABEL_OF_CONCEPT[name])
                     for s in scores if s.item.source == "copies" and s.score.concept is not None and s.item.sample == 0
                     and (s.item.prompt, s.item.mode, s.item.index) in labels]
        counted = name in LABEL_OF_CONCEPT and bool(pairs)
        out[name] = ConceptSummary(
            text, sum(r == 2 for r in rated) / len(rated) if rated else None,
            {source: statistics.mean(v) for source, v in by_source.items()},
            sum(1 for s in scores for r in (s.score.concept, s.score.instruction, s.score.fluency) if r is None),
            sum(a == b for a, b in pairs) / len(pairs) if counted else None,
            sum(a and not b for a, b in pairs) if counted else None, sum(b and not a for a, b in pairs) if counted else None,
            len(pairs) if counted else None,
        )
    return out


def items_of(results: EvalResults) -> tuple[list[Item], dict[tuple[str, str, int], str]]:
    """Every completion an eval holds (each sample, every prompt and mode) and each control's own completions, with
    melbo's regex label of each eval completion (its first sample)."""
    items: list[Item] = []
    labels: dict[tuple[str, str, int], str] = {}
    for prompt, entry in results.prompts.items():
        for mode, by_index in entry.completions.items():
            for index, outs in by_index.items():
                labels[(prompt, mode, index)] = outs[0].label if outs else ""
                items += [Item(prompt, out.text, "copies", index, mode, k) for k, out in enumerate(outs)]
    controls = results.controls
    if controls is not None:
        mode = str(controls.settings.get("mode", "greedy"))
        for result in controls.rows():
            for row, vector in enumerate(result.vectors):
                items += [Item(prompt, text, result.name, row, mode) for prompt, text in vector.texts.items()]
    return items, labels


def judge_run(results: EvalResults, cfg: JudgeConfig, run_prompt: str, base_index: int | None,
              save: Callable[[], None], on_progress: Callable[[int, int], None] | None = None, progress: bool = True) -> JudgeResults:
    """Rate every completion of ``results`` (an eval) and store ``judge`` in it: the settings, every rating (the cache),
    per-completion scores and the summary. ``save`` writes eval.json; it is called once the ratings are in (also when
    the judge fails part-way, so the complete ratings are kept for the next call). ``on_progress(done, total)`` per
    rating; without it, unless ``progress`` is False, a spinner in a terminal or notebook, a line a minute in a log."""
    def rating(done: int, total: int, /) -> tuple[str, bool]:
        return f"judge: {done}/{total} ratings", done == total

    with status_unless_given(on_progress, progress, f"asking the judge at {cfg.host}…", rating) as shown:
        return _judge_run(results, cfg, run_prompt, base_index, save, shown)


def _judge_run(results: EvalResults, cfg: JudgeConfig, run_prompt: str, base_index: int | None,
               save: Callable[[], None], on_progress: Callable[[int, int], None] | None) -> JudgeResults:
    cfg.check()
    stored = results.judge
    cache = dict(stored.ratings) if stored else {}
    items, labels = items_of(results)
    concepts = cfg.concept_texts()

    def keep(model: str) -> JudgeResults:
        known = stored.concepts if stored else {}
        kept = JudgeResults(cfg.host, model, TEMPLATE_VERSION, {**known, **concepts}, dict(cache))
        results.judge = kept
        return kept

    try:
        model, requests = judge_items(cfg, items, cache, on_progress)
    except JudgeError:
        if cache and stored is not None:
            keep(stored.model)
            save()
        raise
    judged = keep(model)
    judged.scores = {name: [Scored(item, score_of(cache, model, text, item)) for item in items] for name, text in concepts.items()}
    judged.summary = summarise(cache, model, concepts, judged.scores, run_prompt, base_index, labels)
    judged.requests_last_call = requests
    save()
    return judged
