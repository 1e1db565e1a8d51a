"""The typefaces of the tiny model: those it learns from, and those its judge reads but it never sees.

Role: name each face by its file in a Debian font package (the Makefile's SYSTEM_PACKAGES installs
them) and find it on this machine; Pillow renders them with the FreeType it bundles, so the same
package versions and the same Pillow give the same pixels. Training uses 38 faces of nine
designs: DejaVu Sans and Serif, and the Helvetica, Times, Courier, Bookman, Palatino, Avant Garde
and Zapf Chancery of Liberation, FreeFont and URW. The judge's faces are other designs (Go,
Cantarell, Linux Libertine and Biolinum, Comic Neue, two handwriting fonts), so it tells whether
a digit reads as a digit, not whether it looks like the training data.

Left out of both: faces whose zero carries a dot or a slash (the monospaced DejaVu, Liberation
and Go: at 32 px the mark reads as an 8). Left out of training: faces whose digits close up at
15-20 px, so that a reader (and the judge, measured: 82-87 % of their glyphs against >= 96 % for
the others) takes a 5 for a 6, a 3 for an 8 or a 9 for a 0 -- Pillow's Aileron (the first tiny
model's only face), URW's Century (C059, ball terminals) and the narrow and oblique Helveticas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import ResourceError

__all__ = ["FONT_DIRS", "JUDGE_FACES", "TRAINING_FACES", "Face", "face_packages", "font_file"]

FONT_DIRS = (Path("/usr/share/fonts"), Path("/usr/local/share/fonts"))


@dataclass(frozen=True)
class Face:
    """One typeface file: the Debian package that installs it and its file name there."""

    package: str
    file: str


def _faces(package: str, *files: str) -> tuple[Face, ...]:
    return tuple(Face(package, f) for f in files)


TRAINING_FACES: tuple[Face, ...] = (
    *_faces("fonts-dejavu-core", "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf"),
    *_faces("fonts-dejavu-extra", "DejaVuSans-Oblique.ttf", "DejaVuSansCondensed-Bold.ttf", "DejaVuSerif-Italic.ttf",
            "DejaVuSerifCondensed.ttf"),
    *_faces("fonts-liberation", "LiberationSans-Regular.ttf", "LiberationSans-Bold.ttf", "LiberationSans-Italic.ttf",
            "LiberationSerif-Regular.ttf", "LiberationSerif-Bold.ttf", "LiberationSerif-Italic.ttf"),
    *_faces("fonts-freefont-ttf", "FreeSans.ttf", "FreeSansBold.ttf", "FreeSerif.ttf", "FreeSerifBold.ttf",
            "FreeSerifItalic.ttf", "FreeMono.ttf", "FreeMonoBold.ttf"),
    *_faces("fonts-urw-base35", "NimbusSans-Regular.otf", "NimbusSans-Bold.otf", "NimbusRoman-Regular.otf",
            "NimbusRoman-Bold.otf", "NimbusRoman-Italic.otf", "NimbusMonoPS-Regular.otf", "NimbusMonoPS-Bold.otf",
            "URWBookman-Light.otf", "URWBookman-Demi.otf", "URWBookman-LightItalic.otf", "P052-Roman.otf",
            "P052-Bold.otf", "P052-Italic.otf", "URWGothic-Book.otf", "URWGothic-Demi.otf",
            "URWGothic-BookOblique.otf", "Z003-MediumItalic.otf"),
)

JUDGE_FACES: tuple[Face, ...] = (
    *_faces("fonts-go", "Go-Regular.ttf", "Go-Bold.ttf", "Go-Italic.ttf", "Go-Medium.ttf"),
    *_faces("fonts-cantarell", "Cantarell-Regular.otf", "Cantarell-Bold.otf", "Cantarell-Light.otf",
            "Cantarell-ExtraBold.otf"),
    *_faces("fonts-linuxlibertine", "LinLibertine_R.otf", "LinLibertine_RB.otf", "LinLibertine_RI.otf",
            "LinBiolinum_R.otf", "LinBiolinum_RB.otf", "LinBiolinum_RI.otf"),
    *_faces("fonts-comic-neue", "ComicNeue-Regular.otf", "ComicNeue-Bold.otf", "ComicNeue-Italic.otf",
            "ComicNeue-Light.otf"),
    *_faces("fonts-humor-sans", "Humor-Sans.ttf"),
    *_faces("fonts-dkg-handwriting", "dkg.ttf", "dkgBd.ttf", "dkgIt.ttf", "dkgBI.ttf"),
)


def face_packages(faces: tuple[Face, ...]) -> list[str]:
    """The Debian packages that install `faces`."""
    return sorted({f.package for f in faces})


@functools.lru_cache(maxsize=None)
def font_file(face: Face) -> Path:
    """The face's file on this machine; a missing one is an error naming the package to install."""
    for root in FONT_DIRS:
        if root.is_dir():
            found = sorted(root.rglob(face.file))
            if found:
                return found[0]
    raise ResourceError(
        f"typeface {face.file} (Debian package {face.package}) is not under {', '.join(map(str, FONT_DIRS))}; "
        f"install it: apt-get install {face.package} (`make system` installs all the fonts the tiny model needs)")
