"""Settings of ``ckaqad push`` (and of ``ckaqad pack --push-to-hub``): the options, their defaults and help."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ckaqad_cli.settings import check_choice, check_positive, setting

CardMode = Literal["keep", "replace", "merge"]
CARD_MODES: tuple[str, ...] = ("keep", "replace", "merge")
DEFAULT_COMMIT_BYTES = 8 << 30


@dataclass
class PushConfig:
    """What to push where. The token is deliberately not a field: configs are recorded in run.json."""

    repo_id: str = setting(..., "Hub repository ORG/NAME to push to (created if missing).")
    revision: str = setting("main", "Branch to push to; created from main if missing.")
    private: bool = setting(False, "Create the repository as private (default: public).")
    endpoint: str | None = setting(None, "Hub endpoint URL (default: HF_ENDPOINT, else https://huggingface.co).")
    commit_message: str | None = setting(
        None, "Commit message (default: names the NVFP4 scheme, the format, the base model and the run)."
    )
    card: CardMode = setting(
        "merge", "What to do with an existing README.md in the folder: keep it as is, replace it, or merge (keep its "
        "prose and metadata, refresh ckaqad's sections).", cli_type=str,
    )
    base_model: str | None = setting(
        None, "Hub id of the BF16 model this was made from, for the card (default: the run's teacher)."
    )
    dry_run: bool = setting(
        False, "List the files and their sizes and print the card; no network (default: off)."
    )
    force: bool = setting(False, "Push again when the run already recorded a push.")
    commit_bytes: int = setting(DEFAULT_COMMIT_BYTES, "Bytes of files per commit at most.", cli=False)

    def __post_init__(self) -> None:
        check_choice(self.card, CARD_MODES, "card")
        check_positive(self, ("commit_bytes",))
