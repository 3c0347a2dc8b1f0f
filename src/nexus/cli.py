"""The `nexus` command: info, train, eval, sample, chat, serve (an OpenAI-compatible server),
report (the progress page, or --csv: the records as CSV), prepare (a data source into the
store training reads), compare (runs side by side), export, import. Each subcommand is a thin
layer over a library call; a user's mistake prints one line and exits non-zero (`--debug`
shows the trace)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from nexus.cache import keep_tool_caches_in_cache_dir
from nexus.config import PRESETS, TrainConfig, preset, resolve_train_config
from nexus.errors import NexusError, TrainingInterrupted

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell shows for a writer whose reader left
TRAIN_FLAGS_SKIPPED = {"model", "preset", "data", "out_dir"}  # declared by hand below


def main(argv: list[str] | None = None) -> int:
    keep_tool_caches_in_cache_dir()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except TrainingInterrupted as error:
        print(f"nexus: {error}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NexusError as error:
        if args.debug:
            traceback.print_exc()
        print(f"nexus: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # the reader went away (`nexus info | head -3`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_BROKEN_PIPE
    except OSError as error:  # a disk or permission problem that no check above foresaw
        if args.debug:
            traceback.print_exc()
        where = f" ({error.filename})" if error.filename else ""
        print(
            f"nexus: error: {error.strerror or one_line(error)}{where}; check the paths, their "
            "permissions and free disk space (--debug shows where it happened)",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        hint = ""
        if args.command == "train":  # a second Ctrl-C abandons the step without saving it
            where = f" --out_dir {args.out_dir}" if args.out_dir else ""
            hint = (
                "; the checkpoints already written are intact: continue with "
                f"`nexus train --resume{where}`"
            )
        print(f"nexus: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def one_line(error: BaseException) -> str:
    return " ".join(str(error).splitlines()) or type(error).__name__


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a mistake on the command line is one line like any other error
    (subcommand parsers inherit this class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"nexus: error: {message}; see `{self.prog} --help`\n")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k likeliest bytes (0: all)")
    parser.add_argument(
        "--top_p", type=float, default=1.0, help="keep the likeliest bytes up to this mass"
    )


def sampling_from(args: argparse.Namespace) -> Any:
    from nexus.sampling import Sampling

    try:
        return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as error:
        raise NexusError(f"--{error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="nexus", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="architecture, parameters and FLOPs of a preset")
    info.add_argument("--preset", default="nexus-6m", help=f"one of: {', '.join(PRESETS)}")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=run_info)

    train = commands.add_parser("train", help="train a model (defaults: the reference run)")
    train.add_argument("--preset", help=f"model preset, one of: {', '.join(PRESETS)}")
    train.add_argument("--config", help="TOML or YAML file of settings (flags override it)")
    train.add_argument("--data", help="training text or binary file (default: Tiny Shakespeare)")
    train.add_argument("--out_dir", help="run directory (default: checkpoints/nexus_production)")
    for field in fields(TrainConfig):
        if field.name in TRAIN_FLAGS_SKIPPED:
            continue
        default = f"default: {field.default}"
        if field.type == "bool":  # --name / --no-name; left out, the config decides
            train.add_argument(
                f"--{field.name}", action=argparse.BooleanOptionalAction, help=default
            )
            continue
        kind = {"int": int, "float": float}.get(str(field.type), str)
        train.add_argument(f"--{field.name}", type=kind, help=default)
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue the run in --out_dir from its latest checkpoint, or from PATH",
    )
    train.add_argument(
        "--branch",
        action="store_true",
        help="with --resume PATH of an earlier checkpoint: continue from it and move the run's "
        "later checkpoints and records into an abandoned-<time>/ folder",
    )
    train.add_argument("--force", action="store_true", help="start over in a used --out_dir")
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("eval", help="validation loss and perplexity of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", help="data file (default: the run's own data)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(handler=run_eval)

    sample = commands.add_parser("sample", help="generate text from a checkpoint, streamed")
    sample.add_argument("checkpoint")
    sample.add_argument("--prompt", default="To be")
    sample.add_argument("--max_new_tokens", type=int, default=200, help="bytes to generate")
    add_sampling_arguments(sample)
    sample.add_argument("--seed", type=int, default=1337, help="sample i uses seed + i")
    sample.add_argument("--num_samples", type=int, default=1)
    sample.add_argument(
        "--stop", action="append", default=[], help="end a sample where this text appears"
    )
    sample.add_argument(
        "--json", action="store_true", help="one JSON object per sample: text, bytes/s, settings"
    )
    add_threads_argument(sample)
    sample.set_defaults(handler=run_sample)

    chat = commands.add_parser("chat", help="talk to a checkpoint in the terminal, streamed")
    chat.add_argument("checkpoint")
    add_sampling_arguments(chat)
    chat.add_argument("--seed", type=int, default=1337)
    chat.add_argument(
        "--max_new_tokens",
        type=int,
        help="bytes per reply at most (default: 200, or half of --context if less)",
    )
    chat.add_argument(
        "--context",
        type=int,
        help="bytes the model reads at most; a longer conversation keeps its end "
        "(default: 4 x the model's seq_len)",
    )
    chat.add_argument(
        "--no_carry", action="store_true", help="continue each line on its own, not the talk"
    )
    chat.add_argument(
        "--stop",
        action="append",
        help="end a reply where this text appears (repeatable; default: a blank line; '' for none)",
    )
    add_threads_argument(chat)
    chat.set_defaults(handler=run_chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible completions server")
    serve.add_argument("checkpoint")
    serve.add_argument("--host", default="127.0.0.1", help="default: this machine only")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model_name", help="the model's id in the API (default: the path)")
    serve.add_argument("--max_active", type=int, default=4, help="requests decoded in turn")
    serve.add_argument("--max_queue", type=int, default=16, help="requests that wait; more get 503")
    serve.add_argument("--max_prompt_bytes", type=int, default=8192)
    serve.add_argument(
        "--max_tokens_limit", type=int, default=4096, help="the largest max_tokens taken"
    )
    add_threads_argument(serve)
    serve.set_defaults(handler=run_serve)

    prepare = commands.add_parser(
        "prepare", help="prepare a directory, .jsonl or .gz source into the store training reads"
    )
    prepare.add_argument("--data", required=True, help="a directory, .jsonl or .gz file")
    prepare.add_argument("--text_field", default=TrainConfig.text_field, help="JSON Lines field")
    prepare.add_argument("--include", default=TrainConfig.include, help="name patterns to take")
    prepare.add_argument("--exclude", default=TrainConfig.exclude, help="name patterns to skip")
    prepare.add_argument("--doc_separator", default=TrainConfig.doc_separator)
    prepare.set_defaults(handler=run_prepare)

    report = commands.add_parser(
        "report", help="write TRAINING_PROGRESS.md for a run directory, or its records as CSV"
    )
    report.add_argument("run_dir")
    output = report.add_mutually_exclusive_group()
    output.add_argument(
        "--backtest",
        action="store_true",
        help="forecast the final val loss from the first half of the run's records; score it",
    )
    output.add_argument(
        "--csv",
        nargs="?",
        const="-",
        metavar="PATH",
        help="instead of the page, write every record of metrics.jsonl as CSV to PATH "
        "(- or none: standard output)",
    )
    report.set_defaults(handler=run_report)

    compare = commands.add_parser(
        "compare", help="write COMPARISON.md and comparison.png for runs side by side"
    )
    compare.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a training run's out_dir; table rows in this order",
    )
    compare.add_argument(
        "--out", default=".", metavar="DIR", help="where to write (default: the current directory)"
    )
    compare.set_defaults(handler=run_compare)

    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face Jamba model")
    export.add_argument("checkpoint")
    export.add_argument("out_dir", help="directory for config.json and model.safetensors")
    export.add_argument("--force", action="store_true", help="replace a non-empty out_dir")
    export.set_defaults(handler=run_export)

    load = commands.add_parser("import", help="write a Hugging Face Jamba model as a checkpoint")
    load.add_argument("hf_dir", help="directory with config.json and model.safetensors")
    load.add_argument("checkpoint", help="the checkpoint file to write (e.g. imported.bin)")
    load.add_argument("--seq_len", type=int, help="training/eval window (default: 128)")
    load.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    load.set_defaults(handler=run_import)
    return parser


def run_info(args: argparse.Namespace) -> None:
    from nexus.info import format_info, model_info

    info = model_info(preset(args.preset), args.preset)
    print(json.dumps(info) if args.json else format_info(info))


def run_train(args: argparse.Namespace) -> None:
    overrides = {
        name: value
        for name, value in vars(args).items()
        if name in {f.name for f in fields(TrainConfig)} and value is not None
    }
    if args.branch and not isinstance(args.resume, str):
        raise NexusError("--branch needs --resume PATH: the checkpoint the branch starts from")
    base = resume_base_config(args) if args.resume else None
    notes: list[str] = []
    config = resolve_train_config(args.config, overrides, base=base, notes=notes)
    for note in notes:
        print(note)
    from nexus.distributed import process_group  # after the checks above: torch is slow to import
    from nexus.training import Trainer

    # Under torchrun (WORLD_SIZE > 1) every process joins the group and trains its share.
    with process_group(config.device) as dist:
        Trainer(config, resume=args.resume, force=args.force, branch=args.branch, dist=dist).run()


def resume_base_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """Resuming continues with the run's own settings unless flags or a file change them."""
    from nexus.checkpoint import read_meta

    if isinstance(args.resume, str):
        beside = Path(args.resume).parent / "config.json"
        if args.out_dir is None and not beside.is_file():
            # An imported or copied checkpoint: its folder is no run to write into.
            raise NexusError(
                f"checkpoint {args.resume!r} has no run around it (no config.json beside it); "
                "pass --out_dir DIR to continue from it in a new run directory"
            )
        settings = read_meta(args.resume).get("train_config")  # verified; never unpickled
        if not isinstance(settings, dict):
            raise NexusError(
                f"checkpoint {args.resume!r} holds no training settings; pass a step_<N>.bin "
                "written by `nexus train` to --resume"
            )
        return settings
    out_dir = Path(args.out_dir or TrainConfig().out_dir)
    saved = out_dir / "config.json"
    if not saved.is_file():
        return None  # the trainer reports that there is nothing to resume
    try:
        settings = json.loads(saved.read_text())["train"]
        if not isinstance(settings, dict):
            raise KeyError("train")
        return settings
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise NexusError(
            f"{str(saved)!r} is damaged ({error}); resume with --resume PATH"
        ) from None


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for decoding (default: PyTorch's, one per core); 1 is faster while "
        "another process keeps a core busy",
    )


def load_model_for_use(path: str, threads: int | None = None) -> tuple[Any, Any]:
    import torch

    from nexus.checkpoint import load_checkpoint, model_from_checkpoint
    from nexus.training import pick_device

    if threads is not None:
        if threads < 1:
            raise NexusError(f"--threads must be >= 1, not {threads}")
        torch.set_num_threads(threads)
    checkpoint = load_checkpoint(path)
    model = model_from_checkpoint(checkpoint, pick_device("auto"))
    model.eval()
    return model, checkpoint


def run_eval(args: argparse.Namespace) -> None:
    from nexus.data import ByteCorpus, eval_batches, resolve_dataset
    from nexus.training import evaluate_loss, safe_exp

    model, checkpoint = load_model_for_use(args.checkpoint)
    train_config = TrainConfig.from_dict(checkpoint.meta.get("train_config") or {})
    data_path = resolve_dataset(args.data or train_config.data)
    corpus = ByteCorpus.from_file(data_path, model.config.seq_len)
    batches = eval_batches(
        corpus.val,
        seed=train_config.seed,
        n_batches=train_config.eval_batches,
        batch_size=train_config.eval_batch_size,
        seq_len=model.config.seq_len,
    )
    device = next(model.parameters()).device
    val_loss = evaluate_loss(model, batches, device)
    result = {
        "checkpoint": args.checkpoint,
        "step": checkpoint.step,
        "val_loss": val_loss,
        "val_ppl": safe_exp(val_loss),
        "data": str(data_path),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"step {checkpoint.step}: val loss {val_loss:.4f}, val ppl {result['val_ppl']:.2f}")


def run_sample(args: argparse.Namespace) -> int:
    """Each sample streams to stdout as it is made (a UTF-8 character is never split; bytes that
    are not UTF-8 show as U+FFFD); Ctrl-C ends it there, keeping what was written."""
    import time

    from nexus.generation import as_text, stream

    if args.max_new_tokens < 0:
        raise NexusError("--max_new_tokens must be >= 0")
    if args.num_samples < 1:
        raise NexusError("--num_samples must be >= 1")
    sampling = sampling_from(args)
    model, _ = load_model_for_use(args.checkpoint, args.threads)
    prompt = os.fsencode(args.prompt)  # the bytes as given, even when not valid UTF-8
    stop = [os.fsencode(text) for text in args.stop]
    out = sys.stdout.buffer
    for index in range(args.num_samples):
        seed = args.seed + index
        if args.num_samples > 1 and not args.json:
            out.write(f"--- sample {index + 1} of {args.num_samples} (seed {seed})\n".encode())
        started, produced = time.perf_counter(), []
        pieces = stream(model, prompt, args.max_new_tokens, sampling, seed=seed, stop=stop)
        with ctrl_c_sets() as interrupted:
            for text in as_text(_until(interrupted, pieces, produced), prefix=prompt):
                if not args.json:
                    out.write(text.encode())
                    out.flush()
        if interrupted.is_set():
            out.write(b"\n")
            out.flush()
            print(f"nexus: stopped after {len(b''.join(produced))} bytes", file=sys.stderr)
            return EXIT_INTERRUPTED
        seconds = time.perf_counter() - started
        continuation = b"".join(produced)
        if args.json:
            record = {
                "prompt": prompt.decode(errors="replace"),
                "text": continuation.decode(errors="replace"),
                "bytes": len(continuation),
                "seconds": round(seconds, 4),
                "bytes_per_s": round(len(continuation) / seconds, 1) if seconds > 0 else None,
                "seed": seed,
                "settings": {**vars(sampling), "max_new_tokens": args.max_new_tokens},
            }
            out.write(json.dumps(record).encode() + b"\n")
        else:
            out.write(b"\n")
        out.flush()
    return 0


@contextmanager
def ctrl_c_sets() -> Iterator[threading.Event]:
    """While inside, Ctrl-C (SIGINT) sets the event instead of raising KeyboardInterrupt, so
    a loop can stop between two pieces of output with nothing half written."""
    event = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def _until(stop: threading.Event, chunks: Iterable[bytes], into: list[bytes]) -> Iterator[bytes]:
    """The chunks, each also appended to `into`, until `stop` is set."""
    for chunk in chunks:
        into.append(chunk)
        yield chunk
        if stop.is_set():
            return


def run_chat(args: argparse.Namespace) -> int:
    from nexus.chat import run

    return run(args)


def run_serve(args: argparse.Namespace) -> int:
    from nexus.serve import run

    return run(args)


def run_prepare(args: argparse.Namespace) -> None:
    from nexus.sources import SourceSpec
    from nexus.store import prepare

    spec = SourceSpec(Path(args.data).expanduser(), args.text_field, args.include, args.exclude)
    print(prepare(spec, args.doc_separator, log=lambda message: None).describe())


def run_report(args: argparse.Namespace) -> None:
    from nexus.report import backtest, format_backtest, write_report

    if args.csv == "-":
        from nexus.records_csv import records_csv

        sys.stdout.write(records_csv(Path(args.run_dir)))
    elif args.csv is not None:
        from nexus.records_csv import write_records_csv

        print(f"wrote {write_records_csv(Path(args.run_dir), Path(args.csv))}")
    elif args.backtest:
        print(format_backtest(backtest(Path(args.run_dir))))
    else:
        print(write_report(Path(args.run_dir)))


def run_compare(args: argparse.Namespace) -> None:
    from nexus.compare import compare_runs

    markdown, plot = compare_runs([Path(p) for p in args.run_dirs], Path(args.out))
    print(f"wrote {markdown} and {plot}")


def run_export(args: argparse.Namespace) -> None:
    from nexus.hf import export_to_hf

    out = export_to_hf(args.checkpoint, args.out_dir, overwrite=args.force)
    print(
        f"wrote {out} (config.json, model.safetensors): load it with "
        f"transformers.JambaForCausalLM.from_pretrained({str(out)!r})"
    )


def run_import(args: argparse.Namespace) -> None:
    from nexus.hf import import_from_hf

    if args.seq_len is not None and args.seq_len <= 0:
        raise NexusError("--seq_len must be a positive integer")
    path = import_from_hf(args.hf_dir, args.checkpoint, seq_len=args.seq_len, overwrite=args.force)
    print(f"wrote {path}: use it with `nexus sample {path}` or `nexus eval {path}`")
