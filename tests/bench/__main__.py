"""Run the benchmarks: all of them, or those named (``just bench ingestion query``).

Options after the name go to that benchmark (``just bench evaluations --memory``), one
benchmark at a time."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import time

import tests.bench as package


def available() -> list[str]:
    return sorted(
        info.name.removeprefix("bench_")
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith("bench_")
    )


def main(argv: list[str] | None = None) -> int:
    names = available()
    parser = argparse.ArgumentParser(prog="just bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(names)} (default: all)")
    args, options = parser.parse_known_args(argv)
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(names)}")
    if options and len(args.names) != 1:
        parser.error(f"options ({' '.join(options)}) go to one benchmark, named alone")
    if options:
        takes = inspect.signature(
            importlib.import_module(f"tests.bench.bench_{args.names[0]}").main
        ).parameters
        if not takes:
            parser.error(f"bench {args.names[0]} takes no options ({' '.join(options)})")
    for name in args.names or names:
        print(f"\n=== bench {name} ===", flush=True)
        started = time.perf_counter()
        module = importlib.import_module(f"tests.bench.bench_{name}")
        if options:
            module.main(options)
        else:
            module.main()
        print(f"=== {name}: {time.perf_counter() - started:.1f}s ===", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
