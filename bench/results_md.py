"""bench/RESULTS.md's marked blocks: each table a benchmark measures sits between its own two
HTML comments, and the benchmark rewrites it in place (bench_train.py, bench_gen.py)."""
from __future__ import annotations


def write_block(path: str, block: str, markers: tuple[str, str], section: str,
                heading: str | None = None) -> None:
    """Replace the text from markers[0] to markers[1] by `block` (which starts and ends with
    them). Where the markers are absent, append the block at the end of `section` (its '## '
    heading line), or, with a `heading`, as its own section right after that one (so a
    benchmark that rewrites the whole section keeps it)."""
    with open(path) as f:
        text = f.read()
    start, end = text.find(markers[0]), text.find(markers[1])
    if start >= 0 and end >= 0:
        text = text[:start] + block + text[end + len(markers[1]):]
    else:
        head = text.index(section)
        nxt = text.find("\n## ", head + 1)
        nxt = len(text) if nxt < 0 else nxt
        block = f"{heading}\n\n{block}" if heading else block
        text = text[:nxt].rstrip("\n") + "\n\n" + block + "\n" + text[nxt:]
    with open(path, "w") as f:
        f.write(text)
