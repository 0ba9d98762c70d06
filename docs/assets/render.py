"""Render a terminal capture (text from `tmux capture-pane -p`) to a PNG, as a terminal shows it.

How docs/assets/demo.png was made (Pillow is not a dependency of loopwatch; install it apart):

    # from a clone in a neutral directory (/srv/loopwatch), so no machine's own paths show:
    tmux new -d -s demo -x 110 -y 44 && tmux send-keys -t demo 'clear; bash scripts/demo' Enter
    # when the demo has printed "index rebuilt":
    tmux capture-pane -t demo -p > docs/assets/demo.txt
    python docs/assets/render.py docs/assets/demo.txt docs/assets/demo.png
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
BACKGROUND, TEXT, FINDING, RULE = "#1e1e1e", "#d4d4d4", "#f0b354", "#6cb6ff"


def colour(line: str) -> str:
    # The capture has no colours of its own; the demo's findings and step titles are picked out.
    if line.startswith("loopwatch."):
        return FINDING
    if line.startswith("--- "):
        return RULE
    return TEXT


def main(source: str, target: str, columns: int = 110) -> None:
    lines = Path(source).read_text().rstrip("\n").split("\n")
    font = ImageFont.truetype(FONT, 15)
    width = round(font.getlength("M"))
    height = 19
    pad = 16
    image = Image.new("RGB", (columns * width + 2 * pad, len(lines) * height + 2 * pad), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        # tmux wraps long lines at the pane's width; a wrapped line keeps its first part's colour.
        if row == 0 or len(lines[row - 1]) < columns:
            shade = colour(line)
        draw.text((pad, pad + row * height), line, font=font, fill=shade)
    image.save(target)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
