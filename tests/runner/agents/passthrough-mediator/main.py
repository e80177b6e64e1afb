"""Test mediator: hands the query stage's answer on unchanged, so only the runner's gate applies."""

from hivemind_agent import main


def mediate(ctx):
    answer = ctx.input.stage["answer"]
    return answer["text"] if "text" in answer else dict(answer["json"])


if __name__ == "__main__":
    main(mediate)
