import random
from types import SimpleNamespace

import inpaint_watermark as wm
import pytest
from inpaint_watermark import Options, apply_watermark, inpaint_postprocess, render_mark, watermark_box
from PIL import Image, ImageChops, ImageFont
from pydantic import ValidationError

W, H = 320, 240


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in (wm.ENV_TEXT, wm.ENV_IMAGE, wm.ENV_POSITION, wm.ENV_OPACITY, wm.ENV_MARGIN, wm.ENV_SIZE):
        monkeypatch.delenv(name, raising=False)


def noise(size=(W, H), mode="RGB", seed=0) -> Image.Image:
    rng = random.Random(seed)
    bands = len(mode) if mode in ("RGB", "RGBA", "L") else 3
    data = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * bands))
    return Image.frombytes(mode, size, data)


def make_job(options):
    return SimpleNamespace(id="job-1", request=SimpleNamespace(output_type="png"), options=lambda name: options)


def diff_box(a: Image.Image, b: Image.Image):
    return ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox()


def inside(inner, outer) -> bool:
    return inner[0] >= outer[0] and inner[1] >= outer[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def test_text_changes_only_pixels_inside_the_box():
    image = noise()
    options = Options(text="Generated", opacity=1.0)
    out = apply_watermark(image, options)
    assert out is not image and out.size == image.size and out.mode == image.mode
    changed = diff_box(image, out)
    assert changed is not None
    box = watermark_box(image.size, render_mark(image.size, options).size, "bottom-right", 16)
    assert inside(changed, box)
    # bottom-right corner, margin 16: the changes end at the margin and stay in the bottom-right quarter
    assert changed[2] <= W - 16 and changed[3] <= H - 16
    assert changed[0] >= W // 2 and changed[1] >= H // 2
    # every pixel outside the box is identical (the diff's bounding box proves it; check directly too)
    mask = Image.new("L", image.size, 255)
    mask.paste(0, box)
    outside = ImageChops.difference(image, out)
    assert Image.composite(outside, Image.new("RGB", image.size), mask).getbbox() is None
    assert image.tobytes() == noise().tobytes()  # the input was not edited in place


def test_text_height_is_a_fraction_of_the_image_height():
    image = noise((400, 400))
    out = apply_watermark(image, Options(text="HXg", opacity=1.0, size=0.1))
    changed = diff_box(image, out)
    assert 25 <= changed[3] - changed[1] <= 60  # about 40 px of text (plus outline, descender)
    tiny = apply_watermark(noise((100, 100)), Options(text="HX", opacity=1.0, size=0.01))
    assert diff_box(noise((100, 100)), tiny)[3] - diff_box(noise((100, 100)), tiny)[1] >= 7  # the 10 px floor


@pytest.mark.parametrize("position", ["top-left", "top-right", "bottom-left", "bottom-right", "center"])
def test_each_position_puts_the_box_in_its_corner(position):
    image = noise()
    margin = 10
    changed = diff_box(image, apply_watermark(image, Options(text="wm", position=position, opacity=1, margin=margin)))
    assert changed is not None
    left, top, right, bottom = changed
    if position == "center":
        assert left < W // 2 < right and top < H // 2 < bottom
        return
    vertical, horizontal = position.split("-")
    if horizontal == "left":
        assert left >= margin and right <= W // 2
    else:
        assert right <= W - margin and left >= W // 2
    if vertical == "top":
        assert top >= margin and bottom <= H // 2
    else:
        assert bottom <= H - margin and top >= H // 2


def test_opacity_zero_leaves_the_image_unchanged():
    image = noise()
    options = Options(text="invisible", opacity=0)
    assert apply_watermark(image, options).tobytes() == image.tobytes()
    assert inpaint_postprocess(job=make_job(options), images=[image]) is None


def test_logo_from_the_operators_file(monkeypatch, tmp_path):
    logo = tmp_path / "logo.png"
    Image.new("RGBA", (40, 20), (255, 0, 0, 255)).save(logo)
    monkeypatch.setenv(wm.ENV_IMAGE, str(logo))
    options = Options()
    assert options.image is True and options.text is None
    image = Image.new("RGB", (W, H), (0, 0, 255))
    out = apply_watermark(image, options)
    left, top, right, bottom = diff_box(image, out)
    assert right - left == round(0.2 * W)  # default logo width: 20% of the image's
    assert bottom - top == round(0.2 * W) // 2
    assert (right, bottom) == (W - 16, H - 16)
    r, g, b = out.getpixel(((left + right) // 2, (top + bottom) // 2))
    assert abs(r - 128) <= 2 and g == 0 and abs(b - 127) <= 2  # red over blue at opacity 0.5

    wide = apply_watermark(image, Options(size=0.5, opacity=1))
    left, _, right, _ = diff_box(image, wide)
    assert right - left == W // 2


def test_logo_needs_the_operators_file(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="INPAINT_WATERMARK_IMAGE"):
        Options(image=True)
    assert Options(image=False).image is False  # without the operator's logo, off is the default anyway
    monkeypatch.setenv(wm.ENV_IMAGE, str(tmp_path / "missing.png"))
    with pytest.raises(ValidationError, match="does not exist"):
        Options()


def test_text_and_logo_together(monkeypatch, tmp_path):
    logo = tmp_path / "logo.png"
    Image.new("RGBA", (40, 40), (0, 255, 0, 255)).save(logo)
    monkeypatch.setenv(wm.ENV_IMAGE, str(logo))
    image = noise()
    options = Options(text="both", opacity=1)
    changed = diff_box(image, apply_watermark(image, options))
    mark = render_mark(image.size, options)
    assert mark.height > round(0.2 * W)  # the logo plus a line of text below it
    assert inside(changed, watermark_box(image.size, mark.size, "bottom-right", 16))


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv(wm.ENV_TEXT, "(c) operator")
    monkeypatch.setenv(wm.ENV_POSITION, "top-left")
    monkeypatch.setenv(wm.ENV_OPACITY, "1")
    monkeypatch.setenv(wm.ENV_MARGIN, "4")
    monkeypatch.setenv(wm.ENV_SIZE, "0.1")
    options = Options()
    assert (options.text, options.position, options.opacity, options.margin, options.size) == (
        "(c) operator", "top-left", 1.0, 4, 0.1)
    assert options.image is False
    image = noise()
    changed = diff_box(image, apply_watermark(image, options))
    assert changed[0] >= 4 and changed[1] >= 4 and changed[0] <= 8 and changed[1] <= 10
    # a request's own placement wins over the environment; the operator's text stays (see the policy tests)
    assert Options(position="center", margin=0, size=0.2).model_dump()["position"] == "center"
    # the plugin is on for every job: the worker fills in Options() for a request that does not name it
    job = make_job(Options())
    assert inpaint_postprocess(job=job, images=[image])[0].tobytes() != image.tobytes()


def test_environment_is_read_when_options_are_built(monkeypatch):
    assert Options().text is None
    monkeypatch.setenv(wm.ENV_TEXT, "later")
    assert Options().text == "later"


@pytest.mark.parametrize("name,value", [(wm.ENV_OPACITY, "2"), (wm.ENV_MARGIN, "-1"), (wm.ENV_POSITION, "left"),
                                        (wm.ENV_OPACITY, "half"), (wm.ENV_SIZE, "0")])
def test_bad_environment_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        Options()


@pytest.mark.parametrize("fields", [{"colour": "red"}, {"position": "middle"}, {"opacity": 1.5}, {"margin": -1},
                                    {"size": 0}, {"image_path": "/etc/passwd"}])
def test_invalid_options_are_rejected(fields):
    with pytest.raises(ValidationError):
        Options.model_validate(fields)


def test_invalid_options_become_invalid_request_naming_the_plugin():
    from worker.errors import InvalidRequest
    from worker.plugins import Plugins

    plugins = Plugins(load_entry_points=False, builtins=())
    plugins.register(wm, name="watermark")
    assert plugins.check_options({"watermark": {"text": "ok"}})["watermark"].text == "ok"
    with pytest.raises(InvalidRequest) as raised:
        plugins.check_options({"watermark": {"unknown": 1}})
    assert raised.value.field == "plugins.watermark.unknown"


def test_no_text_and_no_logo_changes_nothing():
    image = noise()
    assert inpaint_postprocess(job=make_job(Options()), images=[image]) is None
    assert inpaint_postprocess(job=make_job({}), images=[image]) is None  # a raw dict (options: true)


def test_hook_returns_new_images_and_passes_latents_through():
    latents = [object(), object()]
    job = make_job(Options(text="x", opacity=1))
    assert inpaint_postprocess(job=job, images=latents) is None
    images = [noise(seed=1), noise(seed=2)]
    before = [i.tobytes() for i in images]
    out = inpaint_postprocess(job=job, images=images)
    assert len(out) == 2 and all(isinstance(i, Image.Image) for i in out)
    assert [i.tobytes() for i in images] == before
    assert all(a.tobytes() != b.tobytes() for a, b in zip(images, out, strict=True))
    mixed = [images[0], latents[0]]
    out = inpaint_postprocess(job=job, images=mixed)
    assert out[1] is latents[0]


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_other_image_modes_keep_their_mode(mode):
    image = noise(mode=mode)
    out = apply_watermark(image, Options(text="mode", opacity=1))
    assert out.mode == mode
    changed = diff_box(image, out)
    assert changed is not None and changed[2] <= W - 16 and changed[3] <= H - 16


def test_tiny_image_with_a_large_margin():
    image = noise((12, 8))
    out = apply_watermark(image, Options(text="a long watermark text", opacity=1, margin=100))
    assert out.size == image.size
    assert watermark_box((12, 8), (50, 50), "top-left", 100) == (0, 0, 12, 8)


# --- memory: measured first, drawn at the size that fits ------------------------------------------------------


class Allocations:
    """Records the size of every image the watermark makes: new tiles, resized ones, and the text masks FreeType
    draws into."""

    def __init__(self, monkeypatch):
        self.sizes: list[tuple[int, int]] = []
        new, resize, getmask2 = Image.new, Image.Image.resize, ImageFont.FreeTypeFont.getmask2

        def record_new(mode, size, *args, **kwargs):
            self.sizes.append(tuple(size))
            return new(mode, size, *args, **kwargs)

        def record_resize(image, size, *args, **kwargs):
            self.sizes.append(tuple(size))
            return resize(image, size, *args, **kwargs)

        def record_getmask2(font, *args, **kwargs):
            mask, offset = getmask2(font, *args, **kwargs)
            self.sizes.append(tuple(mask.size))
            return mask, offset

        monkeypatch.setattr(Image, "new", record_new)
        monkeypatch.setattr(Image.Image, "resize", record_resize)
        monkeypatch.setattr(ImageFont.FreeTypeFont, "getmask2", record_getmask2)

    @property
    def largest(self) -> int:
        return max(w * h for w, h in self.sizes)


@pytest.mark.parametrize(("size", "text"), [((768, 768), "W" * 200), ((320, 240), "W" * 200),
                                            ((1024, 64), "Generated"), ((64, 1024), "Generated by a long caption")])
def test_a_long_text_at_full_size_takes_no_more_memory_than_the_image(monkeypatch, size, text):
    allocations = Allocations(monkeypatch)
    image = noise(size)
    out = apply_watermark(image, Options(text=text, size=1, opacity=1))
    assert out.size == image.size and diff_box(image, out) is not None  # still drawn, just smaller
    assert allocations.largest <= size[0] * size[1]  # before: 200 x "W" on 1024x1024 made a 195128x835 tile
    mark = render_mark(size, Options(text=text, size=1, opacity=1))
    assert mark.width <= size[0] - 32 and mark.height <= size[1] - 32  # within the margins


def test_a_tall_logo_at_full_size_takes_no_more_memory_than_the_image(monkeypatch, tmp_path):
    logo = tmp_path / "pole.png"
    Image.new("RGBA", (2, 400), (255, 0, 0, 255)).save(logo)  # 200 times as tall as wide
    monkeypatch.setenv(wm.ENV_IMAGE, str(logo))
    allocations = Allocations(monkeypatch)
    image = noise((320, 240))
    out = apply_watermark(image, Options(text="and text", size=1, opacity=1))
    assert diff_box(image, out) is not None
    assert allocations.largest <= 320 * 240


def test_the_text_is_drawn_at_the_largest_size_that_fits():
    mark = render_mark((400, 400), Options(text="HX" * 20, size=1, opacity=1))
    assert 400 - 32 - 40 <= mark.width <= 400 - 32  # fills the width between the margins, nearly
    short = render_mark((400, 400), Options(text="HX", size=0.1, opacity=1))
    assert 25 <= short.height <= 60  # fits anyway: drawn at the size asked for (40 px)


# --- policy: the operator's watermark is on every job ---------------------------------------------------------


def check(options):
    """The worker's option check for a request's `plugins` object, with only this plugin registered."""
    from worker.plugins import Plugins

    plugins = Plugins(load_entry_points=False, builtins=())
    plugins.register(wm, name="watermark")
    return plugins.check_options(options)


@pytest.mark.parametrize(("fields", "field"), [
    ({"text": None}, "text"), ({"text": ""}, "text"), ({"text": "   "}, "text"), ({"text": "something else"}, "text"),
    ({"opacity": 0}, "opacity"), ({"opacity": 0.1}, "opacity"),
])
def test_a_request_cannot_remove_the_operators_text(monkeypatch, fields, field):
    from worker.errors import InvalidRequest

    monkeypatch.setenv(wm.ENV_TEXT, "(c) operator")
    with pytest.raises(InvalidRequest) as raised:
        check({"watermark": fields})
    assert raised.value.code == "invalid_request"
    assert raised.value.field == f"plugins.watermark.{field}"
    assert wm.ENV_TEXT in raised.value.message or "opacity" in raised.value.message


def test_a_request_can_still_move_the_operators_text(monkeypatch):
    monkeypatch.setenv(wm.ENV_TEXT, "(c) operator")
    options = check({"watermark": {"position": "top-left", "margin": 0, "size": 0.1, "opacity": 0.9,
                                   "text": "(c) operator"}})["watermark"]
    assert (options.text, options.position, options.opacity) == ("(c) operator", "top-left", 0.9)
    image = noise()
    changed = diff_box(image, inpaint_postprocess(job=make_job(options), images=[image])[0])
    assert changed[0] < W // 2 and changed[1] < H // 2  # top-left
    assert check({})["watermark"].text == "(c) operator"  # a request that does not name the plugin gets it too


def test_a_request_cannot_drop_the_operators_logo(monkeypatch, tmp_path):
    from worker.errors import InvalidRequest

    logo = tmp_path / "logo.png"
    Image.new("RGBA", (40, 20), (255, 0, 0, 255)).save(logo)
    monkeypatch.setenv(wm.ENV_IMAGE, str(logo))
    with pytest.raises(InvalidRequest) as raised:
        check({"watermark": {"image": False}})
    assert raised.value.field == "plugins.watermark.image" and wm.ENV_IMAGE in raised.value.message
    assert check({"watermark": {"text": "added", "position": "center"}})["watermark"].image is True


def test_without_an_operators_watermark_a_request_decides(monkeypatch):
    assert wm.request_may_disable() is True
    assert check({"watermark": {"text": None, "opacity": 0}})["watermark"].active is False
    assert check({"watermark": False})["watermark"] is False
    monkeypatch.setenv(wm.ENV_TEXT, "(c) operator")
    assert wm.request_may_disable() is False


def test_a_request_cannot_turn_the_operators_watermark_off(monkeypatch):
    from worker.errors import InvalidRequest

    monkeypatch.setenv(wm.ENV_TEXT, "(c) operator")
    with pytest.raises(InvalidRequest) as raised:
        check({"watermark": False})
    assert raised.value.field == "plugins.watermark"


def test_latent_outputs_are_refused_while_the_operators_watermark_is_on(monkeypatch):
    from worker.errors import InvalidRequest

    def job(output_type):
        return SimpleNamespace(id="job-1", request=SimpleNamespace(output_type=output_type),
                               options=lambda name: Options())

    assert wm.inpaint_preprocess(job=job("latent")) is None  # no operator's watermark: latents are fine
    monkeypatch.setenv(wm.ENV_TEXT, "(c) operator")
    assert wm.inpaint_preprocess(job=job("png")) is None
    with pytest.raises(InvalidRequest) as raised:
        wm.inpaint_preprocess(job=job("latent"))
    assert raised.value.field == "output_type" and wm.ENV_TEXT in raised.value.message


@pytest.mark.parametrize(("options", "field"), [({"margin": 10**9}, "margin"), ({"size": 1e-9}, "size")])
def test_a_request_cannot_shrink_the_operators_mark_to_nothing(monkeypatch, options, field):
    from worker.errors import InvalidRequest

    monkeypatch.setenv(wm.ENV_TEXT, "(c) operator")
    with pytest.raises(InvalidRequest) as raised:
        check({"watermark": options})
    assert raised.value.field == f"plugins.watermark.{field}"
    monkeypatch.delenv(wm.ENV_TEXT)
    assert check({"watermark": options})["watermark"]  # without an operator's mark the request decides
