"""Recipes: YAML files validated into typed configs. Unknown keys are errors that name the key.

A recipe says where the seeds come from and how to read them, which model and engine to use,
how to sample, and what each later stage keeps. ``load_recipe`` applies ``--set`` overrides
(dotted paths, values parsed as YAML) before validation, so an override is checked like the file.
A ``--set`` value that is not valid YAML, or that holds Jinja (``{{``/``{%``) and does not parse
as a YAML string, is taken as the plain string it is (``--set generation.prompt_template={{
question }} Answer briefly.`` needs no quoting).

Recipe YAML (the file, ``--set`` values, a deployment's ``overrides``) is loaded by
:func:`load_yaml`: PyYAML's safe loader, refusing documents whose aliases expand to more than
``MAX_YAML_VALUES`` values (an alias bomb, "billion laughs"), nest deeper than
``MAX_YAML_DEPTH`` levels, or refer to themselves, before anything is built from them; a
recipe file over ``MAX_RECIPE_BYTES`` (1 MiB) is refused unread.

Templates from recipes (``generation.prompt_template``, ``score.judge.template``) are untrusted
code, checked by :func:`schemas.templates.check_template` (a trial render in the sandbox, in a
child process with its CPU time and memory capped) when the recipe is validated.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.templates import check_template

DATASET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # values (scalars, lists, mappings) of a recipe with its aliases expanded
MAX_YAML_DEPTH = 64


class YamlRefused(ValueError):
    """A YAML document that is valid but refused (what it would expand to); the message says why."""


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, max_values: int, max_depth: int) -> None:
    """Refuse a composed YAML graph that would expand past the limits or refers to itself. Each
    node is visited once (an alias is the same node again), so a billion-laughs file costs
    microseconds here, not the billions of values it names."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _yaml_children(node)
            sizes[key] = 1 + sum(sizes[id(k)] for k in kids)
            depths[key] = 1 + max((depths[id(k)] for k in kids), default=0)
            if sizes[key] > max_values:
                msg = (
                    f"its aliases expand to more than {max_values:,} values (an alias bomb, a 'billion laughs' file?); "
                    "write the values out, or use fewer aliases"
                )
                raise YamlRefused(msg)
            if depths[key] > max_depth:
                msg = f"it nests more than {max_depth} levels deep"
                raise YamlRefused(msg)
            continue
        if key in sizes:
            continue
        if key in on_path:
            msg = f"an alias refers to a value that contains it (line {node.start_mark.line + 1}): a recursive structure"
            raise YamlRefused(msg)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _yaml_children(node) if id(k) not in sizes)


class _BoundedLoader(yaml.SafeLoader):
    """Stops composing at ``max_depth`` levels: PyYAML's scanner slows down with every open flow
    level (100,000 ``[`` take seconds before any limit), so the depth is refused as it is reached."""

    max_depth = MAX_YAML_DEPTH
    _depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 (PyYAML's signature)
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                msg = f"it nests more than {self.max_depth} levels deep"
                raise YamlRefused(msg)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _one_line_too_deep(text: str | bytes, max_depth: int) -> bool:
    """Does one line open more than ``max_depth`` flow collections (``[``, ``{``; quoted text
    skipped)? PyYAML looks ahead up to 1,024 characters for a key after every one of them, which
    costs about a second for a line of ``[[[[...`` before its own depth is reached; this costs a
    count per line and a walk only of lines with that many brackets."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    for line in text.splitlines():
        if line.count("[") + line.count("{") <= max_depth:
            continue
        depth, quote = 0, ""
        for char in line:
            if quote:
                quote = "" if char == quote else quote
            elif char in "'\"":
                quote = char
            elif char == "#":
                break
            elif char in "[{":
                depth += 1
                if depth > max_depth:
                    return True
            elif char in "]}":
                depth = max(depth - 1, 0)
    return False


def load_yaml(text: str | bytes, *, max_values: int = MAX_YAML_VALUES, max_depth: int = MAX_YAML_DEPTH) -> Any:
    """``yaml.safe_load``, bounded: :class:`YamlRefused` for a document that expands past
    ``max_values`` values or ``max_depth`` levels, or refers to itself (checked on the composed
    graph, before anything is constructed); ``yaml.YAMLError`` as PyYAML raises it otherwise."""
    if _one_line_too_deep(text, max_depth):
        msg = f"it nests more than {max_depth} levels deep"
        raise YamlRefused(msg)
    loader = _BoundedLoader(text)
    loader.max_depth = max_depth
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            msg = f"it nests more than {max_depth} levels deep"
            raise YamlRefused(msg) from None
        if node is None:
            return None
        _check_expansion(node, max_values, max_depth)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _dataset_name(value: str | None) -> str | None:
    if value is not None and not DATASET_NAME.match(value):
        msg = "data set names are 1-64 of a-z 0-9 . _ - and start with a letter or digit"
        raise ValueError(msg)
    return value


DatasetName = Annotated[str | None, AfterValidator(_dataset_name)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldMap(_Strict):
    """Where the question and the reference answer live in a seed row."""

    question: str | list[str] = "question"
    answer: str | None = "answer"
    id: str | None = None  # a stable id column in the seeds, if they have one

    @property
    def question_fields(self) -> list[str]:
        return [self.question] if isinstance(self.question, str) else list(self.question)


class BuiltinSeeds(_Strict):
    """Programmatically generated word problems whose answers the program computes."""

    kind: Literal["arithmetic", "one-step", "one-step-word"] = "arithmetic"
    count: int = Field(32, ge=1, le=1_000_000)
    seed: int = 0


MAX_STRUCTURED_CHARS = 20_000  # a JSON schema or regex from a recipe: the grammar compiler's input
_UNSUPPORTED_REGEX = re.compile(r"\(\?<?[=!]|\\[1-9]|\(\?P=")  # (?=, (?!, (?<=, (?<!, \1, (?P=name)


class StructuredOutput(_Strict):
    """Constrained decoding: every output matches exactly one of these. On the vLLM engines it is
    vLLM's structured outputs (``StructuredOutputsParams``); on an OpenAI-compatible endpoint a JSON
    schema goes as ``response_format`` and a regex or choice as vLLM's ``structured_outputs``."""

    json_schema: dict[str, Any] | None = None  # a JSON Schema object, e.g. {"type": "object", ...}
    regex: str | None = Field(None, min_length=1, max_length=MAX_STRUCTURED_CHARS)
    choice: list[Annotated[str, Field(min_length=1, max_length=1000)]] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutput:
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            msg = f"give exactly one of json_schema, regex or choice (got {', '.join(given) or 'none'})"
            raise ValueError(msg)
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as err:
                raise ValueError(f"regex {self.regex[:80]!r} does not compile: {err}") from None
            if _UNSUPPORTED_REGEX.search(self.regex):
                msg = f"regex {self.regex[:80]!r}: look-arounds and backreferences cannot constrain decoding (vLLM's grammar compilers refuse them)"
                raise ValueError(msg)
        if self.json_schema is not None:
            text = json.dumps(self.json_schema)
            if len(text) > MAX_STRUCTURED_CHARS:
                raise ValueError(f"json_schema is {len(text)} characters as JSON; at most {MAX_STRUCTURED_CHARS}")
            if not isinstance(self.json_schema.get("type", "object"), (str, list)):
                raise ValueError("json_schema: 'type' must be a JSON Schema type name (e.g. \"object\")")
        return self

    def spec(self) -> str:
        """Canonical JSON of the constraint, in vLLM's own names (``json``/``regex``/``choice``):
        what ``SamplingSettings.structured`` carries and the generation cache keys by."""
        if self.json_schema is not None:
            return json.dumps({"json": self.json_schema}, sort_keys=True)
        if self.regex is not None:
            return json.dumps({"regex": self.regex})
        return json.dumps({"choice": self.choice})


class SeedsConfig(_Strict):
    path: str | None = None  # local path or s3://bucket/key (JSONL or Parquet)
    builtin: BuiltinSeeds | None = None
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    fields: FieldMap = FieldMap()
    answer_format: Literal["gsm8k", "plain"] = "plain"
    limit: int | None = Field(None, ge=1)
    # A row (a JSONL line, or a Parquet row as JSON) over this many bytes is quarantined as
    # `too_large` before it is parsed; it is kept whole in rejects/. 1 MiB by default.
    max_row_bytes: int = Field(1 << 20, ge=1024)

    @model_validator(mode="after")
    def _one_source(self) -> SeedsConfig:
        if (self.path is None) == (self.builtin is None):
            msg = "give exactly one of seeds.path (a file or s3:// URI) or seeds.builtin"
            raise ValueError(msg)
        return self


class ModelConfig(_Strict):
    # "vllm": the model runs on the run's own vLLM engines (Ray actors). "openai": a served model
    # behind an OpenAI-compatible endpoint (`vllm serve`, SGLang, TGI, a hosted API) at `base_url`,
    # asked for by `name` (distillery/served.py).
    backend: Literal["vllm", "openai"] = "vllm"
    # "embedded" is the SmolLM2-135M-Instruct folder that `make model` materializes;
    # anything else is a local Hugging Face folder (or a hub id where the network allows it).
    path: str = "embedded"
    name: str | None = None  # lineage's name for it (default: the folder's own); openai: the served model's name
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # openai: the environment variable that holds the key (never the key itself)
    max_concurrency: int = Field(16, ge=1, le=1024)  # openai: requests in flight at once
    timeout_s: float = Field(300.0, gt=0)  # openai: one request's time limit
    max_retries: int = Field(8, ge=0, le=100)  # openai: retries of a request on 429, 5xx, a timeout or a refused connection

    @model_validator(mode="after")
    def _served(self) -> ModelConfig:
        if self.backend == "openai":
            missing = [f"model.{k}" for k in ("base_url", "name") if not getattr(self, k)]
            if missing:
                msg = f"model.backend: openai needs {' and '.join(missing)} (the endpoint, e.g. http://127.0.0.1:8000/v1, and the served model's name)"
                raise ValueError(msg)
            if not self.base_url.startswith(("http://", "https://")):
                msg = f"model.base_url: expected an http:// or https:// URL, got {self.base_url!r}"
                raise ValueError(msg)
        return self


class EngineConfig(_Strict):
    replicas: int = Field(1, ge=1)  # vLLM engines, one Ray actor each
    gpus_per_replica: float = Field(0, ge=0)  # 0 = the CPU build of vLLM
    cpus_per_replica: float = Field(1, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(2048, ge=128)
    dtype: str = "auto"
    # Skip torch.compile / CUDA graphs. None = eager on CPU (measured here: same decode speed,
    # 41 s instead of 145 s to start) and compiled on GPU (where graphs pay off).
    enforce_eager: bool | None = None
    kv_cache_gib: float = Field(1.0, gt=0)  # CPU KV cache space (VLLM_CPU_KVCACHE_SPACE)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    # Requests an engine runs at once (vLLM's max_num_seqs); None = what vLLM itself batches.
    max_in_flight: int | None = Field(None, ge=1)
    # True: every engine is fed from all shards in flight and a shard's results return as soon
    # as its own requests finish. False: one shard at a time per engine, which makes the text
    # reproducible bit for bit (vLLM's output depends on the batch a request ran in).
    continuous_batching: bool = True


class AdaptiveConfig(_Strict):
    """An adaptive sampling budget: easy problems stop early, hard ones get more tries."""

    target_correct: int = Field(1, ge=1)  # stop a problem once this many of its samples verify
    max_samples: int = Field(16, ge=1)  # the budget: samples drawn for one problem at most


EvolveOperation = Literal["add_constraints", "deepen", "concretize", "more_reasoning", "breadth"]


class EvolveConfig(_Strict):
    """Evol-Instruct before sampling (``distillery/stages/evolve.py``): each round rewrites every
    surviving instruction once, by one operation picked per instruction; failed rewrites are
    eliminated with a reason. The last round's instructions are what gets sampled. 0 rounds: off."""

    rounds: int = Field(0, ge=0, le=8)
    operations: list[EvolveOperation] = Field(
        default_factory=lambda: ["add_constraints", "deepen", "concretize", "more_reasoning", "breadth"], min_length=1
    )
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(192, ge=1)  # the rewrite's length in tokens
    max_chars: int = Field(1500, ge=20)  # a longer rewrite is eliminated (too_long)
    max_similarity: float = Field(0.9, gt=0, le=1)  # as similar to its parent or more: no_change


class SamplingMember(_Strict):
    """One member of an ensemble: a sampling configuration of the generation model."""

    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class SelfInstructConfig(_Strict):
    """Self-Instruct before sampling (``distillery/stages/self_instruct.py``): new tasks from the
    seed pool, dropped when too similar to it (ROUGE-L); with ``members``, Ensemble-Instruct's
    agreement: each member solves each new task, and a task is kept when ``min_agreement`` agree.
    ``per_seed: 0``: off."""

    per_seed: int = Field(0, ge=0, le=64)  # new tasks asked for per seed
    examples: int = Field(3, ge=1, le=16)  # pool tasks shown in each request (the seed first)
    temperature: float = Field(0.9, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(128, ge=1)
    min_chars: int = Field(20, ge=1)
    max_chars: int = Field(1000, ge=20)
    max_similarity: float = Field(0.7, gt=0, le=1)  # ROUGE-L F1 against the pool and earlier new tasks
    members: list[SamplingMember] = Field(default_factory=list)
    min_agreement: int = Field(2, ge=1)
    solve_max_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _agreement_reachable(self) -> SelfInstructConfig:
        if self.members and self.min_agreement > len(self.members):
            msg = f"min_agreement ({self.min_agreement}) is more than the {len(self.members)} members"
            raise ValueError(msg)
        return self


class GlanConfig(_Strict):
    """Taxonomy-driven generation (``distillery/stages/glan.py``): with ``taxonomy`` (a YAML file:
    field -> disciplines -> subjects -> concepts) the model writes a syllabus per subject and
    homework problems per session, and those are the problems sampled (instead of seeds)."""

    taxonomy: str | None = None
    sessions: int = Field(4, ge=1, le=64)  # class sessions per subject's syllabus
    per_session: int = Field(2, ge=1, le=64)  # problems per session
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    syllabus_max_tokens: int = Field(256, ge=1)
    # Constrained decoding holds a syllabus to `sessions` numbered lines, so that none comes back
    # with sessions missing ("short_syllabus"); False: free text, parsed for list items.
    constrained: bool = True
    question_max_tokens: int = Field(160, ge=1)
    min_chars: int = Field(20, ge=1)
    max_chars: int = Field(1000, ge=20)


def _three_members() -> list[SamplingMember]:
    return [SamplingMember(temperature=0.2), SamplingMember(temperature=0.7), SamplingMember(temperature=1.0)]


class DifficultyConfig(_Strict):
    """Difficulty-targeted generation (``distillery/stages/difficulty.py``): probe each problem's
    pass rate with the recipe's own sampling, rewrite the always-solved ones harder and the
    never-solved ones simpler, give each variant the answer ``min_agreement`` of the ensemble
    ``members`` agree on (or drop it), sample originals and variants, and label every sample's
    difficulty by its problem's pass rate (``easy`` at ``easy_at`` or more, ``hard`` at ``hard_at`` or less)."""

    enabled: bool = False
    temperature: float = Field(0.7, ge=0)  # the rewrites'
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(192, ge=1)
    max_chars: int = Field(1500, ge=20)
    max_similarity: float = Field(0.9, gt=0, le=1)
    members: list[SamplingMember] = Field(default_factory=_three_members, min_length=2)
    min_agreement: int = Field(2, ge=2)
    solve_max_tokens: int = Field(256, ge=1)
    easy_at: float = Field(0.8, ge=0, le=1)
    hard_at: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _consistent(self) -> DifficultyConfig:
        if self.min_agreement > len(self.members):
            msg = f"min_agreement ({self.min_agreement}) is more than the {len(self.members)} members"
            raise ValueError(msg)
        if self.hard_at >= self.easy_at:
            msg = f"hard_at ({self.hard_at}) must be below easy_at ({self.easy_at})"
            raise ValueError(msg)
        return self


class GenerationConfig(_Strict):
    samples_per_problem: int = Field(4, ge=1, le=1024)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(384, ge=1)
    seed: int = 0  # the run seed; each sample's seed derives from it, the seed id and the sample index
    shard_size: int = Field(16, ge=1)  # problems per generation task
    system_prompt: str | None = (
        "You are a careful math tutor. Solve the problem step by step, then give the final "
        "answer on its own line as 'The answer is N'."
    )
    prompt_template: str = "{{ question }}"  # Jinja2; sees `question`
    # Sample in rounds of samples_per_problem until a problem has target_correct verified
    # samples or max_samples were drawn for it (None: one round of samples_per_problem).
    adaptive: AdaptiveConfig | None = None
    # Constrain every sample to a JSON schema, a regex or a list of choices (None: free text).
    structured_output: StructuredOutput | None = None
    # Keep every result in the store's generation cache (keyed by model, rendered prompt, sampling
    # and seed) and answer repeated requests from it: distillery/generation_cache.py.
    cache: bool = True

    @field_validator("prompt_template")
    @classmethod
    def _template_is_safe(cls, value: str) -> str:
        check_template(value, ("question",))
        return value


class VerifyConfig(_Strict):
    keep: Literal["correct", "answered", "all"] = "correct"
    fallback_last_number: bool = False
    # Seconds one answer's equivalence check may take (it runs in a worker process that is
    # killed past it); a check that does not finish judges the sample wrong: "verify_timeout"
    timeout_s: float = Field(1.0, gt=0, le=60)


class JudgeConfig(_Strict):
    """LLM-as-judge through the generation engine: a rubric prompt, parsed into 'Score: N'."""

    template: str | None = None  # Jinja2 with `question` and `completion`; None = the built-in rubric
    # Starts the judge's reply, so a small model goes on with a number: "Score:" -> "Score: 7".
    # "" lets the judge write freely (it must still say "Score: N" somewhere).
    response_prefix: str = "Score:"
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    # Constrained decoding holds the reply to the score's form ('Score: N', N in 1..10), so that
    # no reply is unparseable (distillery/stages/score.py: judge_constraint). False: free text.
    constrained: bool = True

    @field_validator("template")
    @classmethod
    def _template_is_safe(cls, value: str | None) -> str | None:
        if value is not None:
            check_template(value, ("question", "completion"))
        return value


class ProgramConfig(_Strict):
    """Program execution: the last Python block of a completion runs in the sandbox."""

    timeout_s: float = Field(5.0, gt=0)
    memory_mb: int = Field(512, ge=32)
    # The sandbox's process-isolation layer (distillery/sandbox.py): auto = bwrap, else unshare, else
    # none with a warning ("auto" defers to $DISTILLERY_SANDBOX_ISOLATION); required = fail without one.
    isolation: Literal["auto", "required", "bwrap", "unshare", "none"] = "auto"


class ScoreConfig(_Strict):
    """How samples are scored; the score lands in ``reward`` and its source in ``reward_source``.

    ``reward_model``: a sequence-classification model served by vLLM's pooling runner: a model
    folder, or a reward model trained by ``distillery train-reward-model`` (STORE/NAME[/vNNNN]).
    ``judge``: the generation model grades each sample. ``majority_vote``: self-consistency
    (``pseudo_correct``, ``agreement``; no reference needed). ``program``: run the completion's
    program in the sandbox (``program_correct``).
    """

    method: Literal["none", "reward_model", "judge", "majority_vote", "program"] = "none"
    reward_model: str | None = None
    judge: JudgeConfig = JudgeConfig()
    program: ProgramConfig = ProgramConfig()

    @model_validator(mode="after")
    def _needs_model(self) -> ScoreConfig:
        if self.method == "reward_model" and not self.reward_model:
            msg = "score.method 'reward_model' needs score.reward_model (a model folder or STORE/NAME[/vNNNN])"
            raise ValueError(msg)
        return self


class PairsConfig(_Strict):
    """Preference pairs (chosen/rejected per problem), published as their own data set."""

    enabled: bool = False
    dataset: DatasetName = None  # defaults to "<dataset>-pairs"
    max_pairs_per_problem: int = Field(1, ge=1)
    min_reward_gap: float = Field(0.0, ge=0)


class SelectConfig(_Strict):
    """Which samples are published (distillery/stages/select.py says what each option does).

    ``label`` is the column that says a sample is right: ``auto`` = ``pseudo_correct`` with
    majority-vote scoring, ``program_correct`` with program scoring, else ``correct``.
    """

    policy: Literal["all", "threshold", "best_of_n", "top_k"] = "all"
    label: Literal["auto", "correct", "pseudo_correct", "program_correct"] = "auto"
    min_reward: float | None = None
    k: int = Field(1, ge=1)
    difficulty: Literal["any", "drop_all_solved", "drop_all_failed", "band"] = "any"
    band: tuple[float, float] = (0.0, 1.0)
    pairs: PairsConfig = PairsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> SelectConfig:
        if self.policy == "threshold" and self.min_reward is None:
            msg = "select.policy 'threshold' needs select.min_reward"
            raise ValueError(msg)
        if not 0.0 <= self.band[0] <= self.band[1] <= 1.0:
            msg = f"select.band {list(self.band)} must be [low, high] with 0 <= low <= high <= 1"
            raise ValueError(msg)
        return self

    def label_column(self, method: str) -> str:
        if self.label != "auto":
            return self.label
        return {"majority_vote": "pseudo_correct", "program": "program_correct"}.get(method, "correct")


class DedupConfig(_Strict):
    """Exact and MinHash/LSH near-dedup. The bands x rows trade-off: distillery/stages/dedup.py."""

    exact: bool = True
    near: bool = True
    ngram: int = Field(5, ge=1)  # word n-gram shingles
    num_perm: int = Field(128, ge=16)
    threshold: float = Field(0.8, gt=0, lt=1)
    # LSH banding; None = chosen from the threshold like datasketch's MinHashLSH (equal FP/FN weights)
    bands: int | None = Field(None, ge=1)
    rows_per_band: int | None = Field(None, ge=1)
    # Check LSH candidates before clustering: "exact" shingle-set Jaccard (best precision, same
    # recall as the candidates), "signature" agreement (no text needed), or "none".
    verify_candidates: Literal["none", "signature", "exact"] = "exact"
    seed: int = 1  # MinHash permutation seed (datasketch's default)
    against: list[str] = []  # earlier versions or data sets to dedup against: STORE/NAME[/vNNNN]
    # Rows of one Ray task of MinHash signatures: a shard with more rows fans out over Ray
    # workers, one with fewer is computed in the run's process (no Ray cluster started for it).
    signature_task_rows: int = Field(50_000, ge=1)

    @model_validator(mode="after")
    def _banding(self) -> DedupConfig:
        if (self.bands is None) != (self.rows_per_band is None):
            msg = "give both dedup.bands and dedup.rows_per_band, or neither"
            raise ValueError(msg)
        if self.bands is not None and self.bands * self.rows_per_band > self.num_perm:
            msg = f"dedup.bands * dedup.rows_per_band = {self.bands * self.rows_per_band} exceeds dedup.num_perm = {self.num_perm}"
            raise ValueError(msg)
        return self


class BenchmarkSource(_Strict):
    """A benchmark to keep out of the data: a JSONL/Parquet file (local or s3://) and its text fields."""

    name: str
    path: str
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    fields: list[str] = ["question"]  # joined with a space, like seeds.fields.question


class DecontaminationConfig(_Strict):
    benchmarks: list[BenchmarkSource] = []
    ngram: int = Field(13, ge=3)  # the common 13-gram rule
    near_threshold: float = Field(0.6, gt=0, le=1)  # MinHash Jaccard that counts as a near copy
    # Items under this many words also count when a text of at most twice that length holds them
    # with a few words inserted, deleted or swapped (every number kept); 0 turns that rule off
    short_item_words: int = Field(30, ge=0)
    short_max_edits: int = Field(2, ge=1)  # word edits allowed there (and at most one per 6 words of the item)
    columns: list[str] = ["question", "completion"]  # which text columns are checked


class QualityConfig(_Strict):
    enabled: bool = True
    min_chars: int = Field(20, ge=0)
    max_chars: int = Field(20_000, ge=1)
    repeated_ngram: int = Field(3, ge=1)  # word n-gram size for the repetition check
    max_repeated_ngram_share: float = Field(0.3, gt=0, le=1)  # share of n-grams that are repeats
    drop_truncated: bool = True  # finish_reason == "length"
    require_final_answer: bool = True  # a completion with no extractable final answer
    max_non_text_share: float = Field(0.3, gt=0, le=1)  # share of characters that are not letters, digits, space or common punctuation
    column: str = "completion"


class CollapseConfig(_Strict):
    """Model-collapse statistics of the output against the seeds, and an optional gate."""

    ngram_sizes: list[int] = [1, 2, 3]
    top_k: int = Field(100, ge=1)
    max_top_k_share: float | None = Field(None, gt=0, le=1)  # gate: fail the run above this
    min_distinct_2: float | None = Field(None, gt=0, le=1)  # gate: fail the run below this


class ProcessSupervisionConfig(_Strict):
    """Step labels of the run's verified samples (distillery/stages/step_labels.py), published as
    their own data set (``kind: process-supervision``, ``<dataset>-steps``)."""

    enabled: bool = False
    method: Literal["per_step", "binary_search"] = "binary_search"
    rollouts: int = Field(4, ge=1, le=64)  # continuations sampled from each prefix
    max_steps: int = Field(12, ge=1, le=64)  # longer solutions are rejects ("too_many_steps")
    max_tokens: int | None = Field(None, ge=1)  # a continuation's; default generation.max_tokens
    temperature: float | None = Field(None, ge=0)  # default generation.temperature
    dataset: DatasetName = None  # default <dataset>-steps


class RationalizeConfig(_Strict):
    """STaR's rationalization (distillery/stages/rationalize.py): the problems no sample solved,
    asked again with the reference answer as a hint; the rationales that stand without it are
    published as their own data set (``<dataset>-rationales``)."""

    enabled: bool = False
    samples: int = Field(2, ge=1, le=64)  # rationales asked per unsolved problem
    max_tokens: int | None = Field(None, ge=1)  # default generation.max_tokens
    temperature: float | None = Field(None, ge=0)  # default generation.temperature
    dataset: DatasetName = None  # default <dataset>-rationales


class ReviseConfig(_Strict):
    """Revision traces (distillery/stages/revise.py): each wrong sample, the verifier's feedback
    and a revision that verifies, published as multi-turn SFT rows (``<dataset>-revisions``) and
    as preference pairs of the revision over the first answer (``<dataset>-revision-pairs``).
    Needs the wrong samples: ``verify.keep`` ``all`` or ``answered``."""

    enabled: bool = False
    samples: int = Field(1, ge=1, le=64)  # revisions asked per wrong sample
    max_tokens: int | None = Field(None, ge=1)  # default generation.max_tokens
    temperature: float | None = Field(None, ge=0)  # default generation.temperature
    dataset: DatasetName = None  # default <dataset>-revisions (its pairs: <dataset>-revision-pairs)


class PublishConfig(_Strict):
    dataset: DatasetName = None  # defaults to the recipe name
    shard_rows: int = Field(50_000, ge=1)
    # The data's license (an SPDX-style id, e.g. apache-2.0, cc-by-4.0), for the exported dataset card
    license: str = Field("other", pattern=r"^[a-z0-9][a-z0-9.+-]{0,63}$")
    # A problem-level train/test split (a hash of each problem's id): the share of problems in "test";
    # rows then carry a `split` column. 0: no split column.
    test_share: float = Field(0.0, ge=0.0, lt=1.0)


class _RecipeBase(_Strict):
    name: str
    description: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not DATASET_NAME.match(value):
            msg = "recipe names are 1-64 of a-z 0-9 . _ - and start with a letter or digit"
            raise ValueError(msg)
        return value

    @property
    def dataset(self) -> str:
        return self.publish.dataset or self.name

    @model_validator(mode="after")
    def _no_credentials(self) -> _RecipeBase:
        # A recipe is stored in every manifest: a secret in it would be published. (load_recipe
        # says the same per field; this catches recipes built in code.)
        found = credential_fields(self.model_dump(mode="json"))
        if found:
            raise ValueError(_credentials_message(found))
        return self

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        canonical = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class Recipe(_RecipeBase):
    """``distillery run``: seeds -> synthesize -> verify -> curate -> publish."""

    seeds: SeedsConfig | None = None  # required unless glan.taxonomy makes the problems
    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    evolve: EvolveConfig = EvolveConfig()
    self_instruct: SelfInstructConfig = SelfInstructConfig()
    glan: GlanConfig = GlanConfig()
    difficulty: DifficultyConfig = DifficultyConfig()
    generation: GenerationConfig = GenerationConfig()
    verify: VerifyConfig = VerifyConfig()
    score: ScoreConfig = ScoreConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontaminationConfig = DecontaminationConfig()
    quality: QualityConfig = QualityConfig()
    collapse: CollapseConfig = CollapseConfig()
    select: SelectConfig = SelectConfig()
    process_supervision: ProcessSupervisionConfig = ProcessSupervisionConfig()
    rationalize: RationalizeConfig = RationalizeConfig()
    revise: ReviseConfig = ReviseConfig()
    publish: PublishConfig = PublishConfig()

    @model_validator(mode="after")
    def _one_strategy(self) -> Recipe:
        strategies = (
            ("evolve.rounds", self.evolve.rounds),
            ("self_instruct.per_seed", self.self_instruct.per_seed),
            ("glan.taxonomy", self.glan.taxonomy),
            ("difficulty.enabled", self.difficulty.enabled),
        )
        chosen = [name for name, on in strategies if on]
        if len(chosen) > 1:
            msg = f"{' and '.join(chosen)} are {'both' if len(chosen) == 2 else 'all'} set: a recipe uses one synthesis strategy"
            raise ValueError(msg)
        if (self.seeds is None) == (self.glan.taxonomy is None):
            msg = "give seeds (the problems to start from) or glan.taxonomy (problems written from a taxonomy), not both or neither"
            raise ValueError(msg)
        return self

    @model_validator(mode="after")
    def _adaptive_budget(self) -> Recipe:
        adaptive = self.generation.adaptive
        if adaptive is not None and adaptive.max_samples < self.generation.samples_per_problem:
            msg = (
                f"generation.adaptive.max_samples ({adaptive.max_samples}) is below one round of "
                f"generation.samples_per_problem ({self.generation.samples_per_problem})"
            )
            raise ValueError(msg)
        return self

    @property
    def pairs_dataset(self) -> str:
        return self.select.pairs.dataset or f"{self.dataset}-pairs"

    @property
    def steps_dataset(self) -> str:
        return self.process_supervision.dataset or f"{self.dataset}-steps"

    @property
    def rationales_dataset(self) -> str:
        return self.rationalize.dataset or f"{self.dataset}-rationales"

    @property
    def revisions_dataset(self) -> str:
        return self.revise.dataset or f"{self.dataset}-revisions"

    @property
    def revision_pairs_dataset(self) -> str:
        return f"{self.revise.dataset}-pairs" if self.revise.dataset else f"{self.dataset}-revision-pairs"

    @model_validator(mode="after")
    def _revise_needs_wrong_samples(self) -> Recipe:
        if self.revise.enabled and self.verify.keep == "correct":
            msg = "revise.enabled needs the wrong samples: set verify.keep to all or answered (with correct, verify drops them)"
            raise ValueError(msg)
        return self


class CurateRecipe(_RecipeBase):
    """``distillery curate``: the curation stages on an existing data set (no generation)."""

    format: Literal["auto", "jsonl", "parquet"] = "auto"
    text_column: str = "completion"  # the text that is filtered, deduplicated and checked
    id_column: str | None = None  # a stable row id in the input; else one is made from the row number
    quality: QualityConfig = QualityConfig(require_final_answer=False)
    decontaminate: DecontaminationConfig = DecontaminationConfig()
    dedup: DedupConfig = DedupConfig()
    collapse: CollapseConfig = CollapseConfig()
    publish: PublishConfig = PublishConfig()


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and each bad field."""


def credential_fields(data: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(field path, why)`` for every string in ``data`` that carries credentials: a URI with
    ``user:password@``, or an ``s3://`` URI with a query string (a presigned signature)."""
    from distillery.uri_io import credentials_in_uri

    if isinstance(data, dict):
        return [hit for k, v in data.items() for hit in credential_fields(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(data, (list, tuple)):
        return [hit for i, v in enumerate(data) for hit in credential_fields(v, f"{prefix}.{i}")]
    if isinstance(data, str):
        why = credentials_in_uri(data)
        return [(prefix, why)] if why else []
    return []


def _credentials_message(found: list[tuple[str, str]]) -> str:
    fields = "; ".join(f"field '{where}': {why}" for where, why in found)
    return (
        f"{fields}. A recipe is stored in every manifest, so it must hold no secrets: give credentials "
        "through the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile), never in a URI"
    )


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field's annotation (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed where ``loc`` points (its last part is the unknown key)."""
    cls: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int) or cls is None:
            continue
        field = cls.model_fields.get(str(part))
        cls = _model_in(field.annotation) if field is not None else None
    return list(cls.model_fields) if cls is not None else []


def _format_errors(source: str, err: ValidationError, model: type[BaseModel] = BaseModel) -> str:
    import difflib

    from distillery.uri_io import redact_uri

    lines = [f"recipe {source} is invalid:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            known = _known_fields(model, tuple(e["loc"]))
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known fields here: {', '.join(known)}" if known else "check the spelling"
            message = f"unknown field; {hint} (README.md's Recipes section lists the fields)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            shown = e["input"]
            if isinstance(shown, str) and credential_fields(shown):
                shown = "***"  # never echo a secret
            message = f"{message} (got {redact_uri(repr(shown))})"
        lines.append(f"  field '{where}': {redact_uri(message)}")
    return "\n".join(lines)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        msg = f"--set {assignment!r}: expected key=value, e.g. --set generation.temperature=0.7"
        raise RecipeError(msg)
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        msg = f"--set {assignment!r}: empty key segment in {key!r}"
        raise RecipeError(msg)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            msg = f"--set {assignment!r}: field '{part}' is not a section"
            raise RecipeError(msg)
        node = child
    node[parts[-1]] = _override_value(key.strip(), raw)


def _override_value(key: str, raw: str) -> Any:
    """A ``--set`` value: YAML (``0.7``, ``true``, ``[a, b]``, ``null``), except that text YAML
    cannot parse, or Jinja that does not parse to a string, is the plain string it is."""
    if not raw.strip():
        return None
    jinja = "{{" in raw or "{%" in raw or "{#" in raw
    try:
        value = load_yaml(raw)
    except YamlRefused as err:
        if jinja:  # braces YAML would nest: a template, taken as text
            return raw
        msg = f"--set {key}: the value is refused: {err}"
        raise RecipeError(msg) from None
    except yaml.YAMLError:
        return raw  # e.g. an unquoted template, "{{ question }} Answer briefly."
    if jinja and not isinstance(value, str):
        return raw
    return value


def load_recipe(path: str | Path | None, overrides: list[str] = (), *, model: type[BaseModel] = Recipe) -> Recipe:
    """Validate a recipe file (or, with ``path=None``, only the defaults) plus ``--set`` overrides."""
    if path is None:
        data: dict[str, Any] = {}
        for assignment in overrides:
            apply_override(data, assignment)
        _refuse_credentials("(defaults)", data)
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise RecipeError(_format_errors("(defaults)", err, model)) from None
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_RECIPE_BYTES:
            msg = f"recipe {path} is refused: {path.stat().st_size:,} bytes, more than {MAX_RECIPE_BYTES:,} (a recipe is a small YAML file; data belongs in seeds)"
            raise RecipeError(msg)
        data = load_yaml(path.read_bytes())
    except FileNotFoundError:
        msg = f"recipe {path} not found"
        raise RecipeError(msg) from None
    except IsADirectoryError:
        msg = f"recipe {path} is a folder, expected a YAML file"
        raise RecipeError(msg) from None
    except YamlRefused as err:
        msg = f"recipe {path} is refused: {err}"
        raise RecipeError(msg) from None
    except yaml.YAMLError as err:
        msg = f"recipe {path} is not valid YAML: {err}"
        raise RecipeError(msg) from None
    if not isinstance(data, dict):
        msg = f"recipe {path} must be a YAML mapping of fields, got {type(data).__name__}"
        raise RecipeError(msg)
    for assignment in overrides:
        apply_override(data, assignment)
    _refuse_credentials(str(path), data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(str(path), err, model)) from None


def _refuse_credentials(source: str, data: dict[str, Any]) -> None:
    found = credential_fields(data)
    if found:
        msg = f"recipe {source} is invalid: {_credentials_message(found)}"
        raise RecipeError(msg)
