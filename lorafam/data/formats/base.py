"""The interface every row format implements (one file per format in this folder)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from lorafam.data.encode import CausalEncoder
from lorafam.data.rows import Segments

if TYPE_CHECKING:
    import datasets

    from lorafam.recipe import DataConfig


class Format:
    """One row format: what it needs from a row and what the row becomes.

    Class attributes are all the registry needs: ``data.format``'s choices, auto-detection, column
    checks and whether ``data.packing`` applies all read them, so nothing outside this folder
    names a format. A causal-lm format implements ``segments``; a format whose labels are not
    tokens (classification) overrides ``encoder`` instead.

    An instance is made per prepared dataset with the model's tokenizer; its ``__init__`` may
    refuse a tokenizer it cannot work with (chat needs a chat template) with a LorafamError.
    """

    name: ClassVar[str]
    # Columns a row must have; auto-detection picks the first format (by ``priority``) whose
    # columns are all present, so a format with more specific columns gets a lower priority.
    columns: ClassVar[tuple[str, ...]]
    priority: ClassVar[int]
    task: ClassVar[str] = "causal-lm"  # the model.task this format trains
    # Chat templates write their own BOS and end-of-turn markers; other formats get the tokenizer's.
    writes_special_tokens: ClassVar[bool] = False
    # Why several examples cannot share a row under data.packing; None when they can.
    unpackable: ClassVar[str | None] = None

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def segments(self, row: dict[str, Any], response_only: bool) -> Segments:
        """The row as (text, trainable) pieces; raises lorafam.data.rows.Skip for unusable rows.

        With ``response_only`` false every piece is trained (``lorafam.data.rows.trained``).
        """
        raise NotImplementedError(f"format {self.name} encodes rows with its own encoder")

    def encoder(self, cfg: "DataConfig", label_names: list[str] | None, key: str) -> Any:
        """The ``datasets.map`` function that turns batches of raw rows into model inputs.

        ``key`` ("data.train"/"data.eval") names the recipe key in error messages.
        """
        return CausalEncoder(self, cfg.max_length, cfg.too_long, cfg.response_only)

    @classmethod
    def label_names(cls, train: "datasets.Dataset", given: list[str] | None) -> list[str] | None:
        """Class names for formats with a label column (``given`` wins); None for token labels."""
        return None
