"""diffseg-predict: 2D images and NIfTI (2D and volumes) in, masks / probabilities / uncertainty / overlays out;
bad files skipped and reported; every output written atomically."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

from diffseg_lightning.callbacks import MaskWriter, output_names, overlay_image
from diffseg_lightning.data.folder import ImageFolder
from diffseg_lightning.io.files import file_stem
from diffseg_lightning.io.volumes import nifti_layout
from diffseg_lightning.predict import predict, remove_stale_outputs
from diffseg_lightning.utils.atomic import atomic_write
from diffseg_lightning.utils.errors import DiffSegError

PNG_SIZES = {"a": (40, 40), "b": (32, 48)}
VOLUME_AFFINE = np.array(
    [
        [-0.7, 0.0, 0.0, 12.0],  # flipped x, 0.7 mm
        [0.0, -0.7, 0.0, 20.5],  # flipped y
        [0.0, 0.0, 1.5, -7.0],  # 1.5 mm slices
        [0.0, 0.0, 0.0, 1.0],
    ]
)
SLICE_AFFINE = np.array(
    [[0.0, 0.5, 0.0, 1.0], [-0.5, 0.0, 0.0, 2.0], [0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 0.0, 1.0]]
)


pytestmark = pytest.mark.usefixtures("one_thread")

# Files an earlier run left in the output folder: outputs of inputs that are skipped now (removed), one of
# b.png's (b.tif is skipped for its stem, b.png is predicted: rewritten) and files that are not outputs (kept).
STALE = [
    "colour_mask.png",
    "colour_overlay.png",
    "broken_prob.png",
    "broken_instances.png",
    "nan_mask.nii.gz",
]
STALE += ["nan_uncertainty.nii.gz", "nan_overlay.png"]
NOT_OUTPUTS = ["notes.txt", "colour-mask.png", "a_mask.jpg"]


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    nib.save(image, path)
    return nib.load(path)


def predict_overrides(ckpt: Path, input_dir: Path, output_dir: Path) -> list[str]:
    return [
        f"ckpt_path={ckpt}",
        f"input_dir={input_dir}",
        f"output_dir={output_dir}",
        "sampler.num_steps=2",
        "sampler.num_samples=2",
        "trainer.accelerator=cpu",
        "progress_bar=false",
    ]


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def mixed_run(trained_run, tmp_path_factory):
    """One predict run over PNGs, NIfTI 2D images and a volume, and four files that must be skipped."""
    root = tmp_path_factory.mktemp("predict")
    inputs = root / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name, size in PNG_SIZES.items():
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(inputs / f"{name}.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(inputs / "colour.png")  # 3 channels, model has 1
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)  # unreadable
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(inputs / "b.tif")  # same stem as b.png
    save_nifti(inputs / "slice.nii.gz", rng.normal(size=(36, 28)).astype(np.float32), SLICE_AFFINE)
    save_nifti(inputs / "single.nii", rng.normal(size=(30, 34, 1)).astype(np.float32), np.eye(4))  # (H, W, 1)
    save_nifti(inputs / "volume.nii.gz", rng.normal(size=(32, 32, 3)).astype(np.float32), VOLUME_AFFINE)
    nan = rng.normal(size=(32, 32)).astype(np.float32)
    nan[4, 4] = np.nan
    save_nifti(inputs / "nan.nii.gz", nan, np.eye(4))  # fails when read
    out = root / "pred"
    out.mkdir()
    for name in [*STALE, "b_mask.png", *NOT_OUTPUTS]:
        (out / name).write_bytes(b"from an earlier run")
    handler = LogLines()
    logging.getLogger("diffseg_lightning").addHandler(handler)
    try:
        result = predict(
            compose_config(
                "predict", predict_overrides(trained_run / "checkpoints" / "best.ckpt", inputs, out), root
            )
        )
    finally:
        logging.getLogger("diffseg_lightning").removeHandler(handler)
    return {"inputs": inputs, "out": out, "result": result, "log": handler.lines}


def test_png_outputs_match_each_input(mixed_run):
    out = mixed_run["out"]
    for name, size in PNG_SIZES.items():
        mask, prob, unc = (
            np.asarray(Image.open(out / f"{name}_{kind}.png")) for kind in ("mask", "prob", "uncertainty")
        )
        assert mask.shape == prob.shape == unc.shape == size
        assert mask.dtype == prob.dtype == unc.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        decided = prob != 128  # p = 0.5 exactly stores as 128 but is not above the 0.5 threshold
        assert np.array_equal(
            (mask == 255)[decided], (prob > 127)[decided]
        )  # the mask is the thresholded (resized) probability
        overlay = np.asarray(Image.open(out / f"{name}_overlay.png"))
        assert overlay.shape == (*size, 3)
        grey = ~(mask == 255)
        assert np.array_equal(overlay[grey][:, 0], overlay[grey][:, 1])  # background pixels stay grey


@pytest.mark.parametrize(
    ("name", "shape", "affine"),
    [
        ("slice", (36, 28), SLICE_AFFINE),
        ("single", (30, 34, 1), np.eye(4)),
        ("volume", (32, 32, 3), VOLUME_AFFINE),
    ],
)
def test_nifti_outputs_keep_shape_affine_and_spacing(mixed_run, name, shape, affine):
    source = nib.load(next(mixed_run["inputs"].glob(f"{name}.nii*")))
    outputs = {
        kind: nib.load(mixed_run["out"] / f"{name}_{kind}.nii.gz") for kind in ("mask", "prob", "uncertainty")
    }
    for kind, image in outputs.items():
        assert image.shape == shape, kind
        assert np.array_equal(image.affine, source.affine), kind
        assert image.header.get_zooms() == source.header.get_zooms(), kind
        assert np.allclose(image.affine, affine, atol=1e-6)
    assert outputs["mask"].get_data_dtype() == np.uint8
    assert outputs["prob"].get_data_dtype() == outputs["uncertainty"].get_data_dtype() == np.float32
    mask, prob = np.asarray(outputs["mask"].dataobj), np.asarray(outputs["prob"].dataobj)
    assert set(np.unique(mask)) <= {0, 1}
    assert np.array_equal(mask == 1, prob > 0.5)
    assert 0 <= prob.min() and prob.max() <= 1 and np.asarray(outputs["uncertainty"].dataobj).min() >= 0
    overlay = np.asarray(Image.open(mixed_run["out"] / f"{name}_overlay.png"))
    assert overlay.shape == (*shape[:2], 3)  # a volume's overlay shows its middle slice


def test_bad_files_are_skipped_and_named(mixed_run):
    out, result, log = mixed_run["out"], mixed_run["result"], mixed_run["log"]
    skipped = {Path(p).name: reason for p, reason in result["skipped"]}
    assert skipped.keys() == {"colour.png", "broken.png", "b.tif", "nan.nii.gz"}
    assert skipped["colour.png"] == "image has 3 channel(s) but the config expects 1"
    assert "not a readable image" in skipped["broken.png"]
    assert skipped["b.tif"] == "same output names as b.png"
    assert "NaN" in skipped["nan.nii.gz"]
    assert sorted(Path(p).name for p in result["written"]) == [
        "a.png",
        "b.png",
        "single.nii",
        "slice.nii.gz",
        "volume.nii.gz",
    ]
    for name in skipped:  # one warning line each, and the one-line summary last
        assert sum(name in line and line.startswith("skipping") for line in log) == 1, log
    assert log[-1].startswith("skipped 4 file(s): ") and "colour.png (image has 3 channel(s)" in log[-1]
    assert not list(out.glob("colour_*")) and not list(out.glob("broken_*")) and not list(out.glob("nan_*"))


def test_no_temporary_files_are_left(mixed_run):
    names = sorted(p.name for p in mixed_run["out"].iterdir() if p.name not in NOT_OUTPUTS)
    assert not [n for n in names if ".tmp" in n], names
    assert len(names) == 2 * 4 + 3 * 4  # 2 PNG inputs x 4 files, 3 NIfTI inputs x (3 NIfTI + overlay)
    stems = {Path(p).name: file_stem(p) for p in mixed_run["result"]["written"]}
    assert set(names) <= {n for stem in stems.values() for n in output_names(stem)}  # the names it removes


def test_outputs_an_earlier_run_left_for_skipped_files_are_removed(mixed_run):
    """Outputs named after a file skipped now (unreadable, wrong channels, NaN when read) would pass for its
    prediction: they are removed and listed; the skipped duplicate b.tif does not take b.png's outputs, and
    files that are not outputs stay."""
    out, result, log = mixed_run["out"], mixed_run["result"], mixed_run["log"]
    assert sorted(Path(p).name for p in result["removed"]) == sorted(STALE)
    assert not [name for name in STALE if (out / name).exists()]
    assert (out / "b_mask.png").read_bytes() != b"from an earlier run"  # b.png's, written now
    assert np.asarray(Image.open(out / "b_mask.png")).shape == PNG_SIZES["b"]
    assert all((out / name).read_bytes() == b"from an earlier run" for name in NOT_OUTPUTS)
    (line,) = [line for line in log if line.startswith("removed")]
    assert line.startswith("removed 7 output(s) an earlier run left for skipped file(s): ") and all(
        name in line for name in STALE
    )


def test_stale_outputs_are_never_input_files(tmp_path):
    """With the output folder as the input folder, a file that is itself an input is not removed."""
    for name in ["a.png", "a_mask.png", "a_prob.png", "b.png", "b.tif", "b_mask.png", "c_mask.png"]:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_outputs(
        tmp_path,
        skipped=[tmp_path / "a.png", tmp_path / "b.tif"],
        kept=[tmp_path / "b.png"],
        inputs=[tmp_path / name for name in ("a.png", "a_mask.png", "b.png", "b.tif")],
    )
    assert removed == [
        tmp_path / "a_prob.png"
    ]  # a_mask.png is an input; b_mask.png is b.png's; c not skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_mask.png", "b.png", "b.tif", "b_mask.png", "c_mask.png"]  # fmt: skip


def test_all_bad_or_empty_folder_is_an_error(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(bad / "colour.png")
    (bad / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(
        DiffSegError,
        match=r"no usable image in .* \(2 file\(s\) skipped\): colour\.png: image has 3 "
        r"channel\(s\) but the config expects 1; empty\.nii\.gz: not a readable",
    ):
        predict(compose_config("predict", predict_overrides(ckpt, bad, tmp_path / "out"), tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffSegError, match="holds no images"):
        predict(
            compose_config("predict", predict_overrides(ckpt, tmp_path / "empty", tmp_path / "out"), tmp_path)
        )
    with pytest.raises(DiffSegError, match="does not exist"):
        predict(
            compose_config(
                "predict", predict_overrides(ckpt, tmp_path / "absent", tmp_path / "out"), tmp_path
            )
        )
    assert not (tmp_path / "out").exists()
    unreadable = tmp_path / "nan"  # passes the header check, fails when read: still nothing to write
    unreadable.mkdir()
    save_nifti(unreadable / "nan.nii.gz", np.full((32, 32), np.nan, np.float32), np.eye(4))
    with pytest.raises(DiffSegError, match=r"\(1 file\(s\) skipped\): nan\.nii\.gz: image holds NaN"):
        predict(compose_config("predict", predict_overrides(ckpt, unreadable, tmp_path / "out"), tmp_path))


def test_nifti_layout():
    assert nifti_layout((32, 32), 1) == (0, 1)
    assert nifti_layout((32, 32, 1), 1) == (0, 1)  # a trailing axis of the model's channel count: channels
    assert nifti_layout((32, 32, 3), 3) == (0, 3)
    assert nifti_layout((32, 32, 3), 1) == (3, 1)  # otherwise a volume of axial slices
    assert nifti_layout((32, 32, 5, 3), 3) == (5, 3)
    with pytest.raises(DiffSegError, match="not a 2D image or a 3D volume"):
        nifti_layout((4, 4, 4, 4, 4), 1)
    assert file_stem("x/case.nii.gz") == "case" and file_stem("x/case.v2.png") == "case.v2"


def test_image_folder_items(tmp_path):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    save_nifti(tmp_path / "vol.nii.gz", rng.normal(size=(16, 12, 4)).astype(np.float32), VOLUME_AFFINE)
    save_nifti(tmp_path / "rgbvol.nii.gz", rng.normal(size=(16, 12, 2, 3)).astype(np.float32), VOLUME_AFFINE)
    (tmp_path / "notes.txt").write_text("not an image")
    rgb = ImageFolder(tmp_path, size=8, channels=3)  # an RGB model: the RGB PNG and the 3-channel volume
    assert [(p.name, k) for p, k in rgb.items] == [
        ("rgb.png", -1),
        ("rgbvol.nii.gz", 0),
        ("rgbvol.nii.gz", 1),
    ]
    assert [p.name for p, _ in rgb.skipped] == ["vol.nii.gz"]
    item = rgb[0]
    assert (
        item["image"].shape == (3, 8, 8)
        and item["original_size"].tolist() == [20, 24]
        and item["error"] == ""
    )
    assert rgb[2]["image"].shape == (3, 8, 8) and rgb[2]["slice"] == 1 and rgb[2]["num_slices"] == 2
    grey = ImageFolder(tmp_path, size=None, channels=1)
    assert [(p.name, k) for p, k in grey.items] == [("vol.nii.gz", k) for k in range(4)]
    volume = np.asarray(nib.load(tmp_path / "vol.nii.gz").dataobj)
    assert torch.equal(grey[2]["image"][0], torch.from_numpy(volume[:, :, 2]))


def test_overlay_grey_and_rgb():
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    grey = overlay_image(np.arange(36, dtype=np.float32).reshape(1, 6, 6), mask)
    assert grey.shape == (6, 6, 3) and grey.dtype == np.uint8
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[5, 5].tolist() == [255, 255, 255]  # min-max scaled grey
    assert grey[1, 1].tolist() == [255, 0, 0]  # contour
    assert grey[2, 2, 0] > grey[2, 2, 1] == grey[2, 2, 2]  # translucent fill inside
    rgb = np.zeros((3, 6, 6), np.float32)
    rgb[2] = 10.0  # blue image
    assert overlay_image(rgb, np.zeros((6, 6), bool))[0, 0].tolist() == [0, 0, 255]


def test_atomic_write_leaves_old_file_or_nothing(tmp_path):
    def fail_halfway(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    target = tmp_path / "x_mask.nii.gz"
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail_halfway)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_write(target, fail_halfway)
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    seen = []
    atomic_write(target, lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"new")))
    assert target.read_bytes() == b"new" and seen[0].endswith(".nii.gz") and ".tmp-" in seen[0]


def test_failure_while_writing_leaves_no_partial_output(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out"
    real_save = Image.Image.save

    def save_then_fail(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:10])  # truncated, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    writer = MaskWriter(str(out))
    prediction = {
        "case": [str(tmp_path / "in.png")],
        "original_size": None,
        "probability": torch.full((1, 1, 8, 8), 0.7),
        "entropy": torch.zeros(1, 1, 8, 8),
        "mask": torch.ones(1, 1, 8, 8),
    }
    with pytest.raises(KeyboardInterrupt):
        writer.write_on_batch_end(None, None, prediction, None, {"error": [""]}, 0)
    assert list(out.iterdir()) == [] and writer.written == []


def test_the_written_mask_is_the_methods_own_not_a_threshold_of_the_probability(tmp_path):
    """A method whose mask is not probability > 0.5 (an Otsu threshold of a saliency map, a vote) gets its
    own mask written, resized to the original size."""
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out"
    mask = torch.zeros(1, 1, 6, 8)
    mask[..., :3, :] = 1  # top half, while the probability (0.3 everywhere) is below 0.5
    prediction = {
        "case": [str(tmp_path / "in.png")],
        "original_size": torch.tensor([[12, 16]]),
        "probability": torch.full((1, 1, 6, 8), 0.3),
        "entropy": torch.zeros(1, 1, 6, 8),
        "mask": mask,
    }
    MaskWriter(str(out), overlay=False).write_on_batch_end(None, None, prediction, None, {}, 0)
    written = np.asarray(Image.open(out / "in_mask.png"))
    assert written.shape == (12, 16)
    assert (written[:6] == 255).all() and (written[6:] == 0).all()
    assert (np.asarray(Image.open(out / "in_prob.png")) == round(0.3 * 255)).all()


def test_instance_and_class_maps_are_written_as_uint16_label_pngs(tmp_path):
    """Instance methods (gland diffusion, Hover-Net, ODISE) return label maps; each is written, resized by
    nearest neighbour to the original size, ids unchanged."""
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out"
    instances = torch.zeros(1, 4, 6, dtype=torch.long)
    instances[0, :2, :3], instances[0, 2:, 3:] = 1, 300  # ids above 255 survive
    prediction = {
        "case": [str(tmp_path / "in.png")],
        "original_size": torch.tensor([[8, 12]]),
        "probability": torch.zeros(1, 1, 4, 6),
        "entropy": torch.zeros(1, 1, 4, 6),
        "mask": torch.zeros(1, 1, 4, 6),
        "instances": instances,
        "semantic": (instances > 0).long() * 2,
        "panoptic": torch.rand(1, 3, 4, 6),  # scores, not a label map: not written
    }
    MaskWriter(str(out), overlay=False).write_on_batch_end(None, None, prediction, None, {}, 0)
    written = np.asarray(Image.open(out / "in_instances.png"))
    expected = np.zeros((8, 12), np.int64)
    expected[:4, :6], expected[4:, 6:] = 1, 300
    assert written.shape == (8, 12) and np.array_equal(written, expected)
    assert np.array_equal(np.asarray(Image.open(out / "in_semantic.png")), (expected > 0) * 2)
    assert not (out / "in_panoptic.png").exists()
