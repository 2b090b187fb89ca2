"""Captions built from dataset labels: pure, deterministic functions of the annotations.

The same labels always give the same caption, so a text conditioner sees one consistent
phrasing per label combination and sampling prompts can be written by hand in the same form.
"""

from __future__ import annotations

from collections.abc import Mapping

SPECIES: tuple[str, ...] = ("cat", "dog")

# CelebA hair colours in the order they are named when an image carries several.
_HAIR_COLOURS: tuple[tuple[str, str], ...] = (
    ("Black_Hair", "black"),
    ("Blond_Hair", "blond"),
    ("Brown_Hair", "brown"),
    ("Gray_Hair", "gray"),
)


def readable_name(raw: str) -> str:
    """A file or folder name as words: ``"great_pyrenees" -> "great pyrenees"``, lower case."""
    words = raw.replace("_", " ").replace("-", " ").split()
    if not words:
        raise ValueError(f"cannot make a readable name from {raw!r}: it has no letters")
    return " ".join(words).lower()


def class_caption(name: str) -> str:
    """``"a photo of a {name}"`` for a class folder name (``"Golden_Retriever"``)."""
    return f"a photo of a {readable_name(name)}"


def pet_caption(breed: str, species: str) -> str:
    """Oxford-IIIT Pet caption: ``"a photo of a great pyrenees, a type of dog"``.

    Args:
        breed: breed as in the file names (``"great_pyrenees"``, ``"Abyssinian"``) or as words.
        species: ``"cat"`` or ``"dog"``.
    """
    if species not in SPECIES:
        raise ValueError(f"pet species must be one of {SPECIES}, got {species!r}")
    return f"a photo of a {readable_name(breed)}, a type of {species}"


def _join(parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def celeba_caption(attrs: Mapping[str, bool]) -> str:
    """A readable face caption from CelebA attributes (names as in the annotation file).

    Template: ``"a [smiling] [old] [bald] {man|woman} [with {features}]"`` where the features,
    in this order, are the hair (``"wavy blond hair"``; first set colour of Black, Blond, Brown,
    Gray; ``Wavy_Hair`` / ``Straight_Hair`` as its texture), ``"bangs"``, ``"a mustache"``,
    ``"a beard"`` (CelebA marks a beard as ``No_Beard`` false), ``"eyeglasses"`` and ``"a hat"``.
    A missing attribute counts as false, except ``Young`` and ``No_Beard`` which default to
    true, so an empty mapping reads ``"a woman"``. Age is named only when not ``Young``.

    Example: ``{"Smiling": True, "Blond_Hair": True, "Eyeglasses": True}`` ->
    ``"a smiling woman with blond hair and eyeglasses"``.
    """
    adjectives = []
    if attrs.get("Smiling", False):
        adjectives.append("smiling")
    if not attrs.get("Young", True):
        adjectives.append("old")
    bald = attrs.get("Bald", False)
    if bald:
        adjectives.append("bald")
    person = "man" if attrs.get("Male", False) else "woman"

    features = []
    if not bald:
        colour = next((word for name, word in _HAIR_COLOURS if attrs.get(name, False)), None)
        texture = "wavy" if attrs.get("Wavy_Hair", False) else None
        texture = texture or ("straight" if attrs.get("Straight_Hair", False) else None)
        hair = [word for word in (texture, colour) if word]
        if hair:
            features.append(" ".join(hair) + " hair")
        if attrs.get("Bangs", False):
            features.append("bangs")
    if attrs.get("Mustache", False):
        features.append("a mustache")
    if not attrs.get("No_Beard", True):
        features.append("a beard")
    if attrs.get("Eyeglasses", False):
        features.append("eyeglasses")
    if attrs.get("Wearing_Hat", False):
        features.append("a hat")

    caption = "a " + " ".join([*adjectives, person])
    return caption + (" with " + _join(features) if features else "")
