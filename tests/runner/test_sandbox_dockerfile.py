"""The Dockerfile reader and each backend's rules (hivemind_runner.sandbox.dockerfile). No engine needed."""

from __future__ import annotations

import pytest

from hivemind_runner.sandbox import AGENT_BASE_IMAGE, DockerfileRefused
from hivemind_runner.sandbox.dockerfile import (
    BASE_CMD,
    BASE_ENV,
    check_docker_dockerfile,
    parse_dockerfile,
    plan_process_agent,
)

ALLOWED = (AGENT_BASE_IMAGE,)


def docker_parents(text: str) -> set[str]:
    return check_docker_dockerfile(parse_dockerfile(text), ALLOWED)


def docker_refusal(text: str) -> str:
    with pytest.raises(DockerfileRefused) as caught:
        docker_parents(text)
    assert caught.value.code == "dockerfile_refused"
    return caught.value.message


def process_refusal(text: str) -> str:
    with pytest.raises(DockerfileRefused) as caught:
        plan_process_agent(parse_dockerfile(text))
    return caught.value.message


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = (
        "# a comment\n"
        "FROM hivemind/agent-base:local\n"
        "\n"
        "RUN echo one \\\n"
        "    # a comment inside the continuation\n"
        "    two\n"
        "copy main.py /agent/\n"
    )
    instructions = parse_dockerfile(text)
    assert [(item.keyword, item.line) for item in instructions] == [("FROM", 2), ("RUN", 4), ("COPY", 7)]
    assert instructions[1].arguments == "echo one     two"


def test_parser_honours_the_escape_directive_and_refuses_syntax() -> None:
    instructions = parse_dockerfile("# escape=`\nFROM hivemind/agent-base:local\nRUN a `\n b\n")
    assert instructions[1].arguments == "a  b"
    assert "syntax directive would fetch a frontend image" in docker_refusal(
        "# syntax=docker/dockerfile:1\nFROM hivemind/agent-base:local\n"
    )
    with pytest.raises(DockerfileRefused, match="no instructions"):
        parse_dockerfile("# only a comment\n\n")


def test_docker_allows_the_base_image_stages_and_plain_instructions() -> None:
    assert docker_parents(
        "ARG VERSION=1\n"
        f"FROM {AGENT_BASE_IMAGE} AS build\n"
        "RUN python3 -c 'print(1)' > /tmp/x\n"
        "FROM build\n"
        "COPY --from=build /etc/hostname /agent/h\n"
        "COPY --from=0 --chown=10001:10001 /etc/hostname /agent/h2\n"
        "ADD local.txt /agent/\n"
        'CMD ["python3", "/agent/main.py"]\n'
    ) == {AGENT_BASE_IMAGE}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("FROM python:3.11-slim\n", "parent image 'python:3.11-slim' is not allowed"),
        ("FROM docker.io/hivemind/agent-base:local\n", "is not allowed"),
        ("ARG P=hivemind/agent-base:local\nFROM ${P}\n", "variables in FROM are not allowed"),
        (f"FROM --platform=linux/arm64 {AGENT_BASE_IMAGE}\n", "FROM flags"),
        (f"FROM {AGENT_BASE_IMAGE} AS a b\n", "expected FROM <image> [AS <name>]"),
        (f"FROM {AGENT_BASE_IMAGE}\nCOPY --from=alpine /bin/sh /agent/sh\n", "must name an earlier stage"),
        (f"FROM {AGENT_BASE_IMAGE} AS a\nCOPY --from=a /x /y\n", "must name an earlier stage"),
        (f"FROM {AGENT_BASE_IMAGE}\nADD https://example.com/x.py /agent/\n", "ADD of a URL"),
        (f"FROM {AGENT_BASE_IMAGE}\nADD git@github.com:a/b.git /agent/\n", "ADD of a URL"),
        (f'FROM {AGENT_BASE_IMAGE}\nADD ["http://x/y", "/agent/"]\n', "ADD of a URL"),
        (f"FROM {AGENT_BASE_IMAGE}\nRUN --network=host true\n", "RUN flags"),
        (f"FROM {AGENT_BASE_IMAGE}\nCOPY --link a /agent/\n", "flag --link is not allowed"),
        ("RUN true\n", "the first instruction must be FROM"),
        ("ARG X=1\n", "has no FROM"),
    ],
)
def test_docker_refuses_what_could_reach_a_registry(text: str, expected: str) -> None:
    assert expected in docker_refusal(text)


def test_refusals_name_the_line() -> None:
    assert docker_refusal(f"FROM {AGENT_BASE_IMAGE}\n\nADD http://x/y /agent/\n").startswith(
        "Dockerfile line 3 (ADD):"
    )


def test_process_plan_reads_the_subset() -> None:
    plan = plan_process_agent(
        parse_dockerfile(
            f"FROM {AGENT_BASE_IMAGE}\n"
            "LABEL purpose=test\n"
            "USER root\n"
            "COPY . /agent/\n"
            "WORKDIR lib\n"
            "COPY data.txt ./\n"
            "COPY --chown=10001 a.py b.py /agent/bin/\n"
            "COPY lib/*.p? /agent/\n"
            'ENV GREETING="hello world" MODE=test\n'
            "ENV LEGACY a value with spaces\n"
            'ENTRYPOINT ["python3"]\n'
            'CMD ["/agent/main.py"]\n'
        )
    )
    assert [(step.source, step.destination, step.into) for step in plan.copies] == [
        ("", "/agent", True),
        ("data.txt", "/agent/lib", True),
        ("a.py", "/agent/bin", True),
        ("b.py", "/agent/bin", True),
        ("lib/*.p?", "/agent", True),
    ]
    assert plan.workdir == "/agent/lib"
    assert plan.env == {
        **BASE_ENV,
        "GREETING": "hello world",
        "MODE": "test",
        "LEGACY": "a value with spaces",
    }
    assert plan.command == ["python3", "/agent/main.py"]


def test_process_plan_command_rules_follow_docker() -> None:
    def command(lines: str) -> list[str]:
        return plan_process_agent(parse_dockerfile(f"FROM {AGENT_BASE_IMAGE}\n{lines}")).command

    assert command("") == list(BASE_CMD)
    assert command("CMD python3 main.py --flag\n") == ["/bin/sh", "-c", "python3 main.py --flag"]
    assert command('CMD ["a"]\nENTRYPOINT ["b"]\n') == ["b", "a"]
    assert command('ENTRYPOINT exec python3 x.py\nCMD ["ignored"]\n') == [
        "/bin/sh",
        "-c",
        "exec python3 x.py",
    ]
    assert command('ENTRYPOINT ["python3", "-u"]\n') == ["python3", "-u"]  # the base CMD is dropped
    with pytest.raises(DockerfileRefused, match="sets no command"):
        command("CMD []\n")


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("RUN pip install requests\n", "the process backend cannot RUN; use the Docker backend"),
        ("COPY main.py /opt/main.py\n", "can only place files under /agent"),
        ("WORKDIR /srv\n", "can only place files under /agent"),
        ("COPY [ab].py /agent/\n", "only the * and ? wildcards are supported"),
        ("COPY **/x.py /agent/\n", "only the * and ? wildcards are supported"),
        ("ADD deps.tar.gz /agent/\n", "ADD extracts archives"),
        ("ADD https://example.com/x /agent/\n", "ADD of a URL"),
        ("COPY --chmod=755 x /agent/\n", "flag --chmod is not supported"),
        ("COPY $SRC /agent/\n", "variable substitution is not supported"),
        ("ENV HIVEMIND_SESSION=stolen\n", "cannot set the environment variable 'HIVEMIND_SESSION'"),
        ("EXPOSE 8080\n", "EXPOSE is not supported by the process backend"),
        ("FROM hivemind/agent-base:local\n", "multi-stage builds need the Docker backend"),
    ],
)
def test_process_plan_refuses_everything_else(lines: str, expected: str) -> None:
    assert expected in process_refusal(f"FROM {AGENT_BASE_IMAGE}\n{lines}")


def test_process_plan_only_runs_the_base_image() -> None:
    assert "only runs agents built FROM hivemind/agent-base:local" in process_refusal("FROM python:3.11\n")
    assert "needs FROM" in process_refusal("COPY a /agent/\n")
