"""Rebuild docs/results.md's study tables with `maskkit ablate report` (between their markers).

    python examples/study/summarize.py            # rewrite the tables in docs/results.md
    python examples/study/summarize.py --print    # print them only

Each table is the report of a study directory under docs/studies/ (study.toml and the recorded rows that
examples/study/convert_results.py made from results.jsonl): the same text as
`maskkit ablate report docs/studies/<study>` prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maskkit.ablate import build_report, markdown

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "results.md"
STUDIES = ROOT / "docs" / "studies"
#: marker name -> the studies whose reports stand between `<!-- NAME:begin -->` and `<!-- NAME:end -->`
BLOCKS = {
    "guided-study": ["issue12-mnist5k", "issue12-photos8"],
    "zoo-study": ["issue15-zoo"],
    "study-table": ["issue7-1632", "issue7"],
}


def block(studies: list[str]) -> str:
    return "\n\n".join(f"`maskkit ablate report docs/studies/{name}`\n\n{markdown(build_report(STUDIES / name)).strip()}"
                       for name in studies)  # fmt: skip


def replace_between(doc: str, name: str, text: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in doc or end not in doc:
        raise SystemExit(f"{DOC} has no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the tables instead of writing docs/results.md")
    args = parser.parse_args()
    tables = {name: block(studies) for name, studies in BLOCKS.items()}
    if args.print:
        print("\n\n".join(tables.values()))
        return
    doc = DOC.read_text()
    for name, text in tables.items():
        doc = replace_between(doc, name, text)
    DOC.write_text(doc)
    print(f"wrote the tables into {DOC}")


if __name__ == "__main__":
    main()
