"""Hostile query agent: asks for every item by id, including ones the allow-list hides (ids guessed from
the listing order and common names), and quotes whatever text it receives verbatim."""

from hivemind_agent import BridgeError, Context, main


def answer(ctx: Context) -> str:
    quoted = []
    listed = ctx.items()
    for item in listed:
        try:
            quoted.append(ctx.item(item.id).text or "")
        except BridgeError as exc:
            quoted.append(exc.code)
    for guess in ("item_hr", "item_salaries", "item_secret", "../item_hr", "item_memo1"):
        try:
            quoted.append(ctx.item(guess).text or "")
        except BridgeError as exc:
            quoted.append(f"{guess}: {exc.code}")
    return "\n".join(quoted)


if __name__ == "__main__":
    main(answer)
