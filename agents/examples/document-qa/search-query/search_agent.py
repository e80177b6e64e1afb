"""Example query agent for a document room: keyword search over the items the room allows.

It lists the items this stage may read (the runner has already applied the room's allow-list and
redaction), scores every sentence by how many of the question's keywords it contains, and quotes the
best few with the document each came from. It never sees an item the policy does not allow, and
quotes only redacted text. Headings are not quoted (they title a passage, they do not answer), and
ties go to the document name, then the sentence's place in it: the runner lists items in no
particular order, and the answer should not depend on it.
"""

from __future__ import annotations

import re

from hivemind_agent import Context, Denied, NotFound

MAX_QUOTES = 3
MIN_WORD_CHARS = 3
STOPWORDS = frozenset(
    """the and for are was were with what when where which who whom how does did has have had this that
    these those there their about into from over under than then them they you your our any all can
    could would should will shall may might must not but its it's is be been being of on in to at by
    an a or as do tell me please give show find memo memos document documents""".split()
)


def keywords(question: str) -> list[str]:
    """The question's content words, lowercased, plurals folded, in order, without repeats."""
    words = re.findall(r"[a-z0-9]+", question.lower())
    stems = [word[:-1] if word.endswith("s") and len(word) > 4 else word for word in words]
    chosen = [stem for stem in stems if len(stem) >= MIN_WORD_CHARS and stem not in STOPWORDS]
    return list(dict.fromkeys(chosen))


def sentences(text: str) -> list[str]:
    """Sentences of a Markdown text, without heading markers or list bullets."""
    found = []
    for raw_line in text.splitlines():
        line = re.sub(r"^\s*(?:#+|[-*]|\d+[.)])\s*", "", raw_line).strip()
        found += [part.strip() for part in re.split(r"(?<=[.!?])\s+", line) if part.strip()]
    return found


def score(sentence: str, terms: list[str]) -> int:
    return sum(term in keywords(sentence) for term in terms)


def answer(ctx: Context) -> str:
    terms = keywords(ctx.prompt or "")
    items = [info for info in ctx.items() if info.content_type.startswith("text/")]
    if not items:
        return "This room lets me read no documents."
    names = ", ".join(info.name for info in items)
    if not terms:
        return f"Ask about a topic in the documents I can read: {names}."
    hits: list[tuple[int, str, int, str]] = []  # (-score, document, place, sentence): best first
    for info in items:
        try:
            text = ctx.item(info.id).text or ""
        except (NotFound, Denied):
            continue
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        passages = sentences(body)
        hits += [
            (-score(s, terms), info.name, place, s) for place, s in enumerate(passages) if score(s, terms)
        ]
    if not hits:
        return f"No document I can read mentions {', '.join(terms)} (searched: {names})."
    quotes = "\n".join(f'> "{sentence}" ({name})' for _, name, _, sentence in sorted(hits)[:MAX_QUOTES])
    return f"From {len(items)} documents I may read, the passages about {', '.join(terms)}:\n\n{quotes}"
