"""The trainer's rooms (`train/<room>/`) import only rooms below them, as the README draws them."""

import ast
import pathlib
import re

TRAIN = pathlib.Path(__file__).parents[2] / "train"
README = pathlib.Path(__file__).parents[2] / "README.md"
# Top to bottom; `messages` (what the trainer prints) is below every room.
ROOMS = ("cli", "experiments", "evaluation", "engine", "data", "config", "rundir", "messages")


def imported_rooms(path):
    """The rooms a module imports, lazy imports inside functions included."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            match = re.match(r"keras_bn\.train\.(\w+)", name)
            if match and match.group(1) in ROOMS:
                yield match.group(1)


def test_every_import_points_down_the_rooms():
    wrong = []
    for path in TRAIN.rglob("*.py"):
        room = path.relative_to(TRAIN).parts[0].removesuffix(".py")
        if room not in ROOMS:  # the package's __init__ and __main__
            continue
        for target in imported_rooms(path):
            if ROOMS.index(target) < ROOMS.index(room):
                wrong.append(f"{path.relative_to(TRAIN)} imports {target}")
    assert not wrong, wrong


def test_the_readme_draws_the_rooms_in_import_order():
    drawn = re.findall(r"^train/(\w+)/ ", README.read_text(), flags=re.MULTILINE)
    assert drawn == [room for room in ROOMS if room != "messages"]
