"""Control-image preprocessors (preprocess.py) on synthetic images with known answers."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.morphology import skeletonize

from latentforge.errors import UserError
from latentforge.preprocess import PREPROCESSORS, preprocess, thin


def _square(size=64, box=(16, 16, 47, 47), fg=200, bg=0):
    img = Image.new("RGB", (size, size), (bg,) * 3)
    ImageDraw.Draw(img).rectangle(box, fill=(fg,) * 3)
    return img


def _white(img):
    return np.asarray(img)[..., 0] > 127


def test_registry_names_every_kind():
    assert {"none", "canny", "scribble", "sketch"} <= set(PREPROCESSORS)


def test_none_is_the_image_in_rgb_with_transparency_on_white():
    rgba = Image.new("RGBA", (5, 3), (10, 20, 30, 0))
    out = preprocess(rgba, "none")
    assert out.mode == "RGB" and out.size == (5, 3)
    assert (np.asarray(out) == 255).all()  # fully transparent -> white paper
    grey = Image.new("L", (4, 4), 77)
    assert (np.asarray(preprocess(grey, "none")) == 77).all()


def test_canny_finds_the_square_boundary_and_nothing_else():
    edges = _white(preprocess(_square(), "canny"))
    assert edges.shape == (64, 64)
    outline = np.zeros((64, 64), bool)
    outline[16:48, 16:48] = True
    outline &= ~ndimage.binary_erosion(outline)  # the square's one-pixel border
    near = ndimage.binary_dilation(outline, iterations=1)
    assert edges.any() and not (edges & ~near).any()  # every edge is on the boundary
    covered = ndimage.binary_dilation(edges, iterations=1)
    assert covered[outline].mean() > 0.95  # and the whole boundary is found


def test_canny_thresholds_are_opencv_s_hysteresis_on_the_l1_sobel_magnitude():
    # a step of v grey levels: L1 Sobel magnitude 4 v along a side, 6 v at a corner
    assert not _white(preprocess(_square(fg=33), "canny")).any()  # corners 198 <= high 200
    full = _white(preprocess(_square(fg=34), "canny"))  # corners 204 > 200 pull in the sides
    assert np.array_equal(full, _white(preprocess(_square(fg=200), "canny")))
    corners = _white(preprocess(_square(fg=34), "canny", low=140, high=200))  # sides 136 < 140
    assert 0 < corners.sum() < full.sum() / 4 and not (corners & ~full).any()
    assert not _white(preprocess(Image.new("RGB", (32, 32), "gray"), "canny")).any()
    with pytest.raises(UserError, match="low <= high"):
        preprocess(_square(), "canny", low=200, high=100)


def _outline(size, width, ink=0, paper=255, box=None):
    """A square outline drawn `width` pixels thick along `box`, dark on light by default."""
    x0, y0, x1, y1 = box or (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    h = (width - 1) // 2  # Pillow grows an outline inwards: centre the band on the box
    img = Image.new("RGB", (size, size), (paper,) * 3)
    ImageDraw.Draw(img).rectangle((x0 - h, y0 - h, x1 + h, y1 + h), outline=(ink,) * 3,
                                  width=width)  # fmt: skip
    return img, (x0, y0, x1, y1)


def test_thinning_matches_scikit_image_up_to_spurs():
    rng = np.random.default_rng(0)
    for k in range(5):
        mask = ndimage.binary_dilation(rng.random((48, 48)) < 0.02, iterations=1 + k % 3)
        ours, ref = thin(mask), skeletonize(mask)
        assert not (ours & ~mask).any()
        # every pixel of ours lies on or next to scikit-image's skeleton, same components
        assert ndimage.distance_transform_edt(~ref)[ours].max() <= 1.5
        eight = np.ones((3, 3))
        assert ndimage.label(ours, eight)[1] == ndimage.label(ref, eight)[1]


def test_scribble_keeps_a_drawn_square_as_thin_white_lines_on_black():
    img, (x0, y0, x1, y1) = _outline(128, width=7)
    out = preprocess(img, "sketch")
    lines = _white(out)
    assert out.mode == "RGB" and out.size == (128, 128)
    centre = np.zeros_like(lines)  # the middle of the drawn 7-pixel band
    centre[y0 : y1 + 1, x0 : x1 + 1] = True
    centre &= ~ndimage.binary_erosion(centre)
    assert ndimage.binary_dilation(lines, iterations=2)[centre].mean() > 0.95
    assert ndimage.distance_transform_edt(~centre)[lines].max() <= 3  # nothing else
    assert not lines[40:88, 40:88].any() and not lines[:20].any()
    # stroke 128 / 32 = 4: the line is 4 pixels across, not the drawing's 7
    assert lines[64, x0 - 5 : x0 + 6].sum() == 4


def test_scribble_strokes_do_not_depend_on_the_pen_or_the_polarity():
    thin_pen = _white(preprocess(_outline(96, width=2)[0], "scribble"))
    thick_pen = _white(preprocess(_outline(96, width=9)[0], "scribble"))
    assert (thin_pen & thick_pen).sum() / (thin_pen | thick_pen).sum() > 0.5
    light_on_dark = _outline(96, width=5, ink=255, paper=0)[0]
    assert np.array_equal(
        _white(preprocess(light_on_dark, "scribble")),
        _white(preprocess(_outline(96, width=5)[0], "scribble")),
    )


@pytest.mark.parametrize("size", [(1, 1), (37, 91), (300, 150)])
def test_every_preprocessor_takes_any_size(size):
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).line((0, 0, size[0], size[1]), fill="black", width=2)
    for kind in PREPROCESSORS:
        out = preprocess(img, kind)
        assert out.size == size and out.mode == "RGB"


def test_bad_images_and_options_are_one_line_errors(tmp_path):
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:2000])  # a truncated file
    bad = [
        ("not an image", "scribble", {}, "must be a picture"),
        (Image.new("RGB", (0, 4)), "canny", {}, "sides must be >= 1"),
        (Image.new("1", (20_000, 20_000)), "none", {}, "at most"),
        (Image.open(path), "scribble", {}, "not readable"),
        (_outline(8, 1)[0], "depth", {}, "unknown control preprocessor 'depth'"),
        (_outline(8, 1)[0], "canny", {"sigma": 1}, "takes low, high, not sigma"),
        (_outline(8, 1)[0], "scribble", {"stroke": 0}, "stroke width must be >= 1"),
    ]
    for image, kind, options, message in bad:
        with pytest.raises(UserError, match=message) as e:
            preprocess(image, kind, **options)
        assert "\n" not in str(e.value)
