"""Command line: python -m kdkernels {info,check,bench,report,demo} [options]; --help on each."""
from __future__ import annotations

import importlib
import sys

# command -> (module with a main(argv) function, one-line summary)
COMMANDS = {
    "info": ("kdkernels.cli", "versions, devices, which backends can run here and why not"),
    "check": ("kdkernels.cli", "every available backend against the float64 reference: a PASS/FAIL table"),
    "bench": ("kdkernels.bench", "forward+backward time, peak memory and error of every backend and peer"),
    "report": ("kdkernels.report", "registers, spills, SASS and predicted H200 floors of every kernel (no GPU needed)"),
    "demo": ("kdkernels.demo", "the lessons of knowledge distillation, reproduced on handwritten digits;\n"
             "         --lm [--quick]: distilling a small language model (kdkernels.demo_lm)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip() + "\n")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<6} {summary}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] == "demo" and "--lm" in argv[1:]:   # the LM demo has its own module and options
        from . import demo_lm
        return demo_lm.main([a for a in argv[1:] if a != "--lm"]) or 0
    mod = importlib.import_module(COMMANDS[argv[0]][0])
    return getattr(mod, f"main_{argv[0]}" if hasattr(mod, f"main_{argv[0]}") else "main")(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
