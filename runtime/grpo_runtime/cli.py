"""`grpo` command line: validate, train, report, crd, docs, operator.

Exit codes are part of the contract with the operator: 0 success, 2 bad input (the pod is
not retried), 1 anything else (the pod is retried from the last checkpoint).
"""

from __future__ import annotations

import argparse
import sys

from grpo_runtime.spec import SpecError, load_job, summary

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """Input the user must fix (spec, model, dataset, reward import): exit 2, no retry."""


def _print_errors(header: str, messages: list[str]) -> None:
    print(header, file=sys.stderr)
    for message in messages:
        print(f"  {message}", file=sys.stderr)


def completion_form(job) -> str:
    """In which form the rewards get completions, as far as the manifest tells (grpo_runtime.prompts.chat_messages
    decides it per prompt, knowing the tokenizer and the dataset, which validate loads neither of)."""
    if job.spec.model.use_chat_template:
        return "completions as chat messages (as text if the tokenizer has no chat template)"
    return "completions as text (as chat messages if the prompts are)"


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.file)
    except SpecError as exc:
        _print_errors(f"{args.file}: invalid GRPOJob ({len(exc.messages)} error(s))", exc.messages)
        return EXIT_BAD_INPUT
    print(f"{summary(job)}, {completion_form(job)}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    try:
        job = load_job(args.file)
    except SpecError as exc:
        _print_errors(f"{args.file}: invalid GRPOJob ({len(exc.messages)} error(s))", exc.messages)
        return EXIT_BAD_INPUT
    from grpo_runtime.distributed import under_torchrun
    from grpo_runtime.run import run_job, run_ranks  # torch is imported only when training

    if job.spec.resources.world_size > 1 and not under_torchrun():
        again = [args.file, *(["--output", args.output] if args.output else []),
                 *(["--max-steps", str(args.max_steps)] if args.max_steps is not None else []),
                 *(["--quiet"] if args.quiet else [])]
        return run_ranks(job, again)
    return run_job(job, output=args.output, max_steps=args.max_steps, quiet=args.quiet)


def cmd_report(args: argparse.Namespace) -> int:
    from grpo_runtime.report import write_report

    return write_report(args.uri, args.out)


def cmd_crd(args: argparse.Namespace) -> int:
    from grpo_operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return EXIT_OK


def cmd_docs(args: argparse.Namespace) -> int:
    from grpo_runtime.reference import reference_markdown

    sys.stdout.write(reference_markdown())
    return EXIT_OK


def cmd_operator(args: argparse.Namespace) -> int:
    from grpo_operator.main import run_operator

    return run_operator()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grpo", description="GRPO fine-tuning on one GPU per job.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a GRPOJob manifest; exit 2 with every error found")
    p.add_argument("file")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="run a GRPOJob here, without a cluster")
    p.add_argument("file")
    p.add_argument("--output", help="override spec.output.uri (local dir, s3://, gs:// or az://bucket/prefix)")
    p.add_argument("--max-steps", type=int, help="override spec.training.maxSteps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="plot the reward curves of a run's metrics to a PNG")
    p.add_argument("uri", help="the run's output (local dir, s3://, gs:// or az://bucket/prefix)")
    p.add_argument("--out", default="rewards.png", help="PNG to write (default rewards.png)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("crd", help="print the GRPOJob CustomResourceDefinition generated from the spec")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("docs", help="print docs/reference.md, the GRPOJob field reference generated from the spec")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("operator", help="run the kopf operator (settings from the environment)")
    p.set_defaults(func=cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
