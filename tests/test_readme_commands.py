"""Every `kvcondense ...` command of the README's quick tour parses: no flag there that the CLI does not have."""

import re
import shlex
from pathlib import Path

import pytest

from kvcondense.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_commands() -> list[list[str]]:
    """The quick tour's shell commands as argument lists (continuation lines joined, trailing comments dropped)."""
    text = README.read_text()
    tour = text[text.index("## Quick tour") : text.index("\n## ", text.index("## Quick tour") + 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", tour, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("| ", 1)[1] if "| kvcondense " in line else line  # echo ... | kvcondense chat
            if line.strip().startswith("kvcondense "):
                commands.append(shlex.split(line, comments=True))
    return commands


def test_the_tour_has_commands_of_every_kind():
    names = {c[1] for c in tour_commands()}
    assert {"train", "eval", "generate", "bench", "export", "report", "chat", "list"} <= names, names


@pytest.mark.parametrize("command", tour_commands(), ids=" ".join)
def test_a_quick_tour_command_parses(command):
    argv = command[1:]
    args = build_parser(argv).parse_args(argv)  # an unknown flag or a bad value exits here, naming it
    assert args.command == argv[0]
