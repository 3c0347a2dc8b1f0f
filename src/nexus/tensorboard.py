"""TensorBoard event files of a run, when the optional `tensorboard` package is installed: every
record the trainer appends to metrics.jsonl, as scalars tagged `train/<key>` (each log line) and
`eval/<key>` (each eval), plus each eval's sample and an early stop's reason as text, all at
the training step. They live in `<out_dir>/tensorboard/`, the directory to pass to
`tensorboard --logdir`. metrics.jsonl stays the record of the run; these files are a view of it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nexus.rundir import TENSORBOARD_DIR

SCALARS = {
    "train": ("loss", "lr", "grad_norm", "tokens_per_s"),
    "eval": ("train_loss", "train_ppl", "val_loss", "val_ppl"),
}
OPTIONAL_SCALARS = ("aux_loss",)  # an MoE model's load-balancing loss
SAMPLE_TAG = "eval/sample"
STOP_TAG = "stop/reason"


class TensorBoardLog:
    """One training process's event file in a run's tensorboard directory."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, run_dir: Path, first_step: int) -> TensorBoardLog | None:
        """The log of a run that trains from `first_step` on, or None when tensorboard is not
        installed. A resumed run redoes the steps after its checkpoint: `purge_step` has
        TensorBoard drop the older events of those steps (as the trainer drops their
        metrics.jsonl records), so no curve shows a step twice."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return cls(SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=first_step))

    def add(self, record: dict[str, Any]) -> None:
        """Write a metrics.jsonl record at its step: a "train" or an "eval" one as scalars, a
        "stop" one (--early_stop ended the run) as the text of its reason."""
        step = record["step"]
        if record["kind"] == "stop":
            self.writer.add_text(STOP_TAG, record["reason"], step)
            self.writer.flush()
            return
        optional = [key for key in OPTIONAL_SCALARS if key in record]
        for key in [*SCALARS[record["kind"]], *optional]:
            self.writer.add_scalar(f"{record['kind']}/{key}", record[key], step)
        if record["kind"] == "eval":
            self.writer.add_text(SAMPLE_TAG, sample_markdown(record["sample"]), step)
        # The writer's own flush comes every two minutes; someone watching wants this record now.
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def sample_markdown(sample: str) -> str:
    """The sample as a Markdown code block (TensorBoard renders text as Markdown): its line
    breaks and characters shown as generated, whatever they are."""
    return "\n".join("    " + line for line in sample.split("\n"))
