"""Tray icon images, one distinct colour per state, drawn with Pillow (no image files)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from corolla.agent.state import AgentState

STATE_COLOURS: dict[AgentState, tuple[int, int, int]] = {
    AgentState.STOPPED: (128, 128, 128),
    AgentState.STARTING: (245, 166, 35),
    AgentState.SHARING: (40, 180, 70),
    AgentState.PAUSED_BUSY: (52, 120, 246),
    AgentState.ERROR: (220, 50, 50),
}


def state_image(state: AgentState, size: int = 64) -> Image.Image:
    """A round icon in the state's colour with a five-petal mark.

    Args:
        state: Which state to draw.
        size: Width and height in pixels.

    Returns:
        An RGBA image.
    """
    colour = STATE_COLOURS[state]
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((1, 1, size - 2, size - 2), fill=(*colour, 255))
    centre, petal = size / 2, size * 0.13
    for dx, dy in ((0, -1), (0.95, -0.31), (0.59, 0.81), (-0.59, 0.81), (-0.95, -0.31)):
        x, y = centre + dx * size * 0.2, centre + dy * size * 0.2
        draw.ellipse((x - petal, y - petal, x + petal, y + petal), fill=(255, 255, 255, 235))
    draw.ellipse((centre - petal, centre - petal, centre + petal, centre + petal), fill=(*colour, 255))
    return image
