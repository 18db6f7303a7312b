"""Which way an image goes in ``predict --faces auto`` on a face-finding model: a face crop,
classified whole, or a photo, whose faces are found first. Decided per image, cheaply: by
its size (read from the file's header); small pictures where faces sit at one place go the
crop way when their own face is there (the aligner's check,
:func:`featgender.faces.align.face_stays_in_box` and :func:`~featgender.faces.align.chip_face_score`);
the others by the face the detectors find in each. numpy, PIL and dlib only: the torch-free
runtime decides the same way.
"""

from __future__ import annotations

from PIL import Image

from featgender.faces.align import CROP_FALLBACK_BOX
from featgender.faces.detect import crop_face, cut_faces

NO_FACE = "no face found"
# 'auto' on a face-finding model: a picture larger than this (its longer side, in pixels) is a
# photo; dataset crops are smaller (CelebA 178 x 218, UTKFace 200, FairFace 224, LFW 250, 512)
CROP_MAX_SIDE = 512
# ... and a smaller one is a face crop when its faces sit where the others' do, or when the
# largest face found in it spans at least this fraction of its shorter side (or none is found)
CROP_FACE_FRACTION = 0.35
# A picture whose folder's faces are at least this wide (its calibrated box), in pixels, has no
# face under the detectors' 80 px window to seek: a face framed otherwise is framed at most a
# third smaller (portraits: 0.7-1.25x the folder's size), still 100 px or more
SMALL_FACES_BELOW = 160


def image_size(image) -> tuple[int, int] | None:
    """(width, height) of an image path (from its header, nothing decoded) or PIL image; None
    for a file that does not open (its error is reported where it is decoded)."""
    if isinstance(image, Image.Image):
        return image.size
    try:
        with Image.open(image) as opened:
            return opened.size
    except Exception:
        return None


def is_photo_sized(image) -> bool:
    """Whether an image path or PIL image is larger than a face crop (:data:`CROP_MAX_SIDE`),
    from its size alone; a file that does not open is not (its error comes where it is decoded)."""
    size = image_size(image)
    return size is not None and max(size) > CROP_MAX_SIDE


def faces_in_photo(all_faces: bool, detector, picture) -> tuple[str, str | list]:
    """A photo's route, and its largest face (every face with ``all_faces``) as (box, crop)
    pairs, or 'no face found'."""
    return "photo", cut_faces(picture, detector, all_faces) or NO_FACE


def face_in_crop_or_photo(detector, picture, folder_face: float | None = None) -> tuple[str, list]:
    """A small picture whose face is not where the others' are: a crop when its largest face
    spans :data:`CROP_FACE_FRACTION` of it, or when none is found (then the central box, as
    ``--faces crop`` aligns such crops); a photo of a smaller face otherwise. ``folder_face``:
    the width of the folder's faces as a fraction of its pictures' (its calibrated box), where
    known: from :data:`SMALL_FACES_BELOW` pixels up, faces under 80 px are not sought."""
    small_faces = folder_face is None or folder_face * picture.width < SMALL_FACES_BELOW
    faces = cut_faces(picture, detector, small_faces=small_faces)
    if not faces:
        width, height = picture.size
        left, top, right, bottom = CROP_FALLBACK_BOX
        box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
        return "crop", [(box, crop_face(picture, box))]
    (left, top, right, bottom), _ = faces[0]
    large = max(right - left, bottom - top) >= CROP_FACE_FRACTION * min(picture.size)
    return ("crop" if large else "photo"), faces
