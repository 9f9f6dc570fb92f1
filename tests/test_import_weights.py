"""``clipseg3d import-weights`` and ``clipseg3d info`` on synthetic released weight files.

The files are built key by key from the documented tables (tests/data/released/*.tsv: key names,
shapes, dtypes of the released Universal Model and SuPreM files). The imported model's logits
are compared with a reference forward written here from the documented computation.
"""

import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2

from clipseg3d.catalog import ClassCatalog
from clipseg3d.cli import import_weights, info, segment
from clipseg3d.inference.outputs import read_record
from clipseg3d.models.checkpoint import load_model
from clipseg3d.models.genesis_unet import GenesisUNetBackbone
from clipseg3d.models.swin_legacy import LegacyPatchMerging, LegacySwinUNETRBackbone

from conftest import REPO, shared_data

TABLES = REPO / "tests" / "data" / "released"
# the documented pre-1.5 MONAI merge order: (d, h, w) offsets of the eight concatenated samples
DOCUMENTED_OFFSETS = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1)]
EPS = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# -- synthetic released files ---------------------------------------------------------------------
def read_table(name: str) -> list[tuple[str, list[int], str, str]]:
    """(key, shape, dtype, param|buffer) rows of a documented table."""
    rows = []
    for line in (TABLES / f"{name}.tsv").read_text().splitlines()[1:]:
        _, key, shape, dtype, kind = line.split("\t")
        rows.append((key, json.loads(shape), dtype, kind))
    return rows


def synthetic_value(key: str, shape: list[int], dtype: str, generator: torch.Generator) -> torch.Tensor:
    """A random tensor of a plausible scale for a key (so activations stay of order one)."""
    if dtype == "int64":
        if key.endswith("relative_position_index"):
            return torch.randint(0, 13 ** 3, shape, generator=generator)
        return torch.tensor(7)
    noise = torch.randn(shape, generator=generator)
    if key.endswith("organ_embedding"):
        return noise / noise.norm(dim=1, keepdim=True)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=generator)
    if len(shape) >= 2:  # weights: variance-preserving scale
        fan_in = int(np.prod(shape[1:]))
        return noise / fan_in ** 0.5
    if key.endswith("relative_position_bias_table"):
        return 0.02 * noise
    return (1.0 + 0.1 * noise) if key.endswith(".weight") else 0.1 * noise


def synthetic_state(name: str, seed: int = 0, rename=lambda key: key) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {rename(key): synthetic_value(key, shape, dtype, generator) for key, shape, dtype, _ in read_table(name)}


def save_release(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"net": state, "optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "epoch": 12}, path)
    return path


def plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without ``module.`` and ``backbone.``."""
    return {key.removeprefix("module.").removeprefix("backbone."): value for key, value in state.items()}


def run(argv: list) -> tuple[int, str, str]:
    """``clipseg3d TOOL ARGS`` in-process: exit status, stdout, stderr."""
    tool = {"import-weights": import_weights, "info": info, "segment": segment}[argv[0]]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main([str(arg) for arg in argv[1:]])
    return code, out.getvalue(), err.getvalue()


def import_file(source: Path, output: Path, *options) -> Path:
    code, _, err = run(["import-weights", source, "-o", output, *options])
    assert code == 0, err
    return output


# -- the reference forward, from the documented computation -----------------------------------------
def ref_unit(x, w, prefix):
    y = F.conv3d(x, w[f"{prefix}.conv1.weight"], w[f"{prefix}.conv1.bias"], padding=1)
    mean = y.mean(dim=(0, 2, 3, 4), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3, 4), keepdim=True)  # the batch's own statistics
    scale = w[f"{prefix}.bn1.weight"].view(1, -1, 1, 1, 1)
    shift = w[f"{prefix}.bn1.bias"].view(1, -1, 1, 1, 1)
    return torch.relu((y - mean) / torch.sqrt(var + 1e-5) * scale + shift)


def ref_genesis(x, w):
    """Decoder map (64 ch) and bottleneck map (512 ch, 1/8) of the Models Genesis U-Net."""
    def level(x, name):
        return ref_unit(ref_unit(x, w, f"{name}.ops.0"), w, f"{name}.ops.1")

    def up(x, skip, name):
        x = F.conv_transpose3d(x, w[f"{name}.up_conv.weight"], w[f"{name}.up_conv.bias"], stride=2)
        return level(torch.cat([x, skip], dim=1), name)

    s64 = level(x, "down_tr64")
    s128 = level(F.max_pool3d(s64, 2), "down_tr128")
    s256 = level(F.max_pool3d(s128, 2), "down_tr256")
    bottom = level(F.max_pool3d(s256, 2), "down_tr512")
    return up(up(up(bottom, s256, "up_tr256"), s128, "up_tr128"), s64, "up_tr64"), bottom


def ref_head(decoder_map, bottleneck, embeddings, w):
    """Logits [B, K, *S]: precls_conv, GAP, text_to_vision, controller, three dynamic layers."""
    feats = F.conv3d(torch.relu(F.group_norm(decoder_map, 16, w["precls_conv.0.weight"], w["precls_conv.0.bias"])),
                     w["precls_conv.2.weight"], w["precls_conv.2.bias"])
    pooled = torch.relu(F.group_norm(bottleneck, 16, w["GAP.0.weight"], w["GAP.0.bias"])).mean(dim=(2, 3, 4))
    image = pooled @ w["GAP.3.weight"].flatten(1).T + w["GAP.3.bias"]
    text = torch.relu(embeddings.float() @ w["text_to_vision.weight"].T + w["text_to_vision.bias"])
    logits = []
    for b in range(decoder_map.shape[0]):
        per_class = []
        for k in range(text.shape[0]):
            p = w["controller.weight"].flatten(1) @ torch.cat([image[b], text[k]]) + w["controller.bias"]
            w1, w2, w3 = p[0:64].view(8, 8), p[64:128].view(8, 8), p[128:136].view(1, 8)
            b1, b2, b3 = p[136:144], p[144:152], p[152:153]
            h = torch.relu(torch.einsum("oi,i...->o...", w1, feats[b]) + b1.view(8, 1, 1, 1))
            h = torch.relu(torch.einsum("oi,i...->o...", w2, h) + b2.view(8, 1, 1, 1))
            per_class.append((torch.einsum("oi,i...->o...", w3, h) + b3.view(1, 1, 1, 1))[0])
        logits.append(torch.stack(per_class))
    return torch.stack(logits)


class ReferenceMerging(PatchMergingV2):
    """The documented merge order, for the reference Swin UNETR."""

    def forward(self, x):
        parts = [x[:, d::2, h::2, w::2, :] for d, h, w in DOCUMENTED_OFFSETS]
        return self.reduction(self.norm(torch.cat(parts, dim=-1)))


def ref_swin(x, w):
    """Decoder map and bottleneck map of MONAI's Swin UNETR with the documented merge order."""
    net = SwinUNETR(in_channels=1, out_channels=32, feature_size=48, downsample=ReferenceMerging)
    missing, unexpected = net.load_state_dict({k: v for k, v in w.items() if not k.startswith(
        ("organ_embedding", "precls_conv", "GAP", "controller", "text_to_vision"))}, strict=False)
    assert sorted(missing) == ["out.conv.conv.bias", "out.conv.conv.weight"] and not unexpected
    seen = {}
    net.decoder1.register_forward_hook(lambda module, inputs, output: seen.update(decoder=output))
    net.encoder10.register_forward_hook(lambda module, inputs, output: seen.update(bottleneck=output))
    net.eval()(x)
    return seen["decoder"], seen["bottleneck"]


def assert_logits_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within float32 rounding: 1e-5 of the largest |logit| (about 80 float32 epsilons)."""
    scale = expected.abs().max().item()
    assert actual.shape == expected.shape and scale > 0
    assert (actual - expected).abs().max().item() <= 1e-5 * scale, (actual - expected).abs().max().item()
    assert 1e-5 > 64 * EPS  # the tolerance leaves room for sums of a few dozen rounded terms


# -- U-Net ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet_release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("unet")
    state = synthetic_state("universal_unet_released_ckpt_expected", seed=1)
    return save_release(folder / "clip_driven_universal_unet.pth", state), state


@pytest.fixture(scope="module")
def unet_ckpt(unet_release, tmp_path_factory) -> Path:
    return import_file(unet_release[0], tmp_path_factory.mktemp("unet-ckpt") / "unet.ckpt")


def test_the_imported_unet_gives_the_reference_logits(unet_release, unet_ckpt):
    _, state = unet_release
    model, meta = load_model(unet_ckpt)
    assert model.class_names == ClassCatalog.builtin().names
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(x)
        weights = plain(state)
        expected = ref_head(*ref_genesis(x, weights), state["module.organ_embedding"], weights)
    assert_logits_match(logits, expected)


@pytest.mark.parametrize("layout", ["backbone.* (no module.)", "flat module.*"])
def test_other_unet_layouts_import_to_the_same_model(layout, unet_release, unet_ckpt, tmp_path):
    source, state = unet_release
    if layout.startswith("backbone"):
        names = [key for key, *_ in read_table("universal_unet_current_code_layout")]
        renamed = {key.removeprefix("module."): value for key, value in state.items()}
        assert sorted(renamed) == sorted(names)  # exactly the documented current-code names
    else:
        renamed = {key.replace("module.backbone.", "module."): value for key, value in state.items()}
    imported = import_file(save_release(tmp_path / "variant.pth", renamed), tmp_path / "variant.ckpt")
    ours, reference = torch.load(imported)["state_dict"], torch.load(unet_ckpt)["state_dict"]
    assert ours.keys() == reference.keys() and all(torch.equal(ours[key], reference[key]) for key in ours)


def test_a_suprem_unet_imports_with_its_own_class_count(tmp_path):
    state = synthetic_state("suprem_unet_25cls_expected", seed=2)
    source = save_release(tmp_path / "supervised_suprem_unet_2100.pth", state)
    code, _, err = run(["import-weights", source, "-o", tmp_path / "no.ckpt"])
    assert code == 1 and "25 classes" in err and "--class-names" in err and not (tmp_path / "no.ckpt").exists()
    names = ClassCatalog.builtin().names[:25][::-1]
    (tmp_path / "classes.json").write_text(json.dumps(names))
    model, _ = load_model(import_file(source, tmp_path / "suprem.ckpt", "--class-names", tmp_path / "classes.json"))
    assert model.class_names == names
    x = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        weights = plain(state)
        assert_logits_match(model(x), ref_head(*ref_genesis(x, weights), state["module.organ_embedding"], weights))


def test_separate_text_embeddings_replace_a_missing_table(unet_release, tmp_path):
    _, state = unet_release
    without = {key: value for key, value in state.items() if key != "module.organ_embedding"}
    source = save_release(tmp_path / "weights.pth", without)
    code, _, err = run(["import-weights", source, "-o", tmp_path / "no.ckpt"])
    assert code == 1 and "--text-embeddings" in err and not (tmp_path / "no.ckpt").exists()
    table = torch.randn(32, 512).half()  # as released: float16
    torch.save(table, tmp_path / "txt_encoding.pth")
    imported = import_file(source, tmp_path / "w.ckpt", "--text-embeddings", tmp_path / "txt_encoding.pth")
    model, meta = load_model(imported)
    assert torch.equal(model.class_embeddings, table.float())
    assert meta["import"]["text_embeddings"]["file"] == "txt_encoding.pth"
    torch.save(torch.randn(32, 256), tmp_path / "narrow.pth")
    code, _, err = run(["import-weights", source, "-o", tmp_path / "no.ckpt",
                        "--text-embeddings", tmp_path / "narrow.pth"])
    assert code == 1 and "head.text_to_vision.weight [256, 512] (expected [256, 256])" in err
    assert not (tmp_path / "no.ckpt").exists()


def test_batch_statistics_windows_run_one_per_forward():
    torch.manual_seed(0)
    backbone = GenesisUNetBackbone().eval()
    assert backbone.batch_independent is False
    windows = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad():
        together = backbone(windows)
        alone = [backbone(windows[i:i + 1]) for i in range(4)]
        joint = backbone.forward_one(windows)  # one normalisation over all four windows
    for part in (0, 1):
        expected = torch.cat([one[part] for one in alone])
        scale = expected.abs().max().item()
        assert (together[part] - expected).abs().max().item() <= 1e-5 * scale
        assert (joint[part] - expected).abs().max().item() > 1e-2 * scale  # what a shared batch would give


# -- Swin UNETR --------------------------------------------------------------------------------------
def test_legacy_patch_merging_takes_the_documented_offsets_duplicates_included():
    merging = LegacyPatchMerging(dim=3)
    merging.norm, merging.reduction = torch.nn.Identity(), torch.nn.Identity()
    d, h, w = torch.meshgrid(*(torch.arange(4),) * 3, indexing="ij")
    parity = torch.stack([d % 2, h % 2, w % 2], dim=-1).float()[None]  # [1, D, H, W, 3]: each voxel's parities
    merged = merging(parity)
    voxels = merged.reshape(-1, 8, 3)  # every merged voxel: eight 3-channel blocks
    assert torch.equal(voxels, voxels[:1].expand_as(voxels))  # the same parities at every merged voxel
    assert [tuple(int(v) for v in block) for block in voxels[0]] == DOCUMENTED_OFFSETS
    current = PatchMerging(dim=3)
    current.norm, current.reduction = torch.nn.Identity(), torch.nn.Identity()
    assert not torch.equal(current(parity), merged)  # today's MONAI order differs
    backbone = LegacySwinUNETRBackbone()
    stages = [getattr(backbone.swinViT, f"layers{i}")[0].downsample for i in range(1, 5)]
    assert all(type(stage) is LegacyPatchMerging for stage in stages)


@pytest.fixture(scope="module")
def swin_release(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("swin")
    state = synthetic_state("universal_swinunetr_released_ckpt_expected", seed=3)
    return save_release(folder / "clip_driven_universal_swin_unetr.pth", state), state


@pytest.fixture(scope="module")
def swin_ckpt(swin_release, tmp_path_factory) -> Path:
    return import_file(swin_release[0], tmp_path_factory.mktemp("swin-ckpt") / "swin.ckpt")


def test_the_imported_swin_unetr_gives_the_reference_logits(swin_release, swin_ckpt):
    _, state = swin_release
    model, meta = load_model(swin_ckpt)
    assert meta["import"]["layout"] == "module.*" and meta["backbone"]["name"] == "swinunetr_legacy"
    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(x)
        weights = plain(state)
        expected = ref_head(*ref_swin(x, weights), state["module.organ_embedding"], weights)
    assert_logits_match(logits, expected)


@pytest.mark.parametrize("table, layout", [("universal_swinunetr_current_code_layout", "backbone.*"),
                                          ("suprem_swinunetr_32cls_expected", "module.backbone.*")])
def test_nested_swin_layouts_import_the_same_weights(table, layout, swin_release, swin_ckpt, tmp_path):
    _, state = swin_release
    flat = torch.load(swin_ckpt)["state_dict"]
    names = [key for key, *_ in read_table(table)]
    assert [plain({key: 0}).popitem()[0] for key in names] == list(plain(state))  # same tensors, same order
    renamed = dict(zip(names, state.values()))
    nested = torch.load(import_file(save_release(tmp_path / "nested.pth", renamed), tmp_path / "nested.ckpt"))
    assert nested["clipseg3d"]["import"]["layout"] == layout
    assert nested["state_dict"].keys() == flat.keys()
    assert all(torch.equal(nested["state_dict"][key], flat[key]) for key in flat)


# -- refusals: one error line, nothing written --------------------------------------------------------
class Payload:
    """Unpickling this creates ``marker``: what a planted weight file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_refused(argv: list, output: Path, *words: str) -> str:
    code, out, err = run(argv)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1 and lines[0].startswith("clipseg3d import-weights: error: ")
    assert all(word in lines[0] for word in words), lines[0]
    assert not output.exists() and not [path for path in output.parent.iterdir() if path.name.startswith(".")]
    return lines[0]


def test_an_unknown_layout_names_the_first_unmatched_keys(unet_release, tmp_path):
    _, state = unet_release
    extra = {**state, "module.out.conv.weight": torch.zeros(2, 64, 1, 1, 1), "module.aux.bias": torch.zeros(2)}
    source = save_release(tmp_path / "odd.pth", extra)
    output = tmp_path / "out" / "model.ckpt"
    output.parent.mkdir()
    assert_refused(["import-weights", source, "-o", output], output, "unknown weight layout", "module.out.conv.weight",
                   "module.aux.bias")
    wrong = save_release(tmp_path / "wrong.pth", {**state, "module.GAP.3.bias": torch.zeros(128)})
    assert_refused(["import-weights", wrong, "-o", output], output, "wrong shapes", "head.GAP.3.bias")
    other = save_release(tmp_path / "other.pth", {"module.convInit.conv.weight": torch.zeros(16, 1, 3, 3, 3),
                                                  "module.up_layers.0.weight": torch.zeros(2)})
    assert_refused(["import-weights", other, "-o", output], output, "unknown weight layout",
                   "module.convInit.conv.weight, module.up_layers.0.weight")
    assert_refused(["import-weights", unet_release[0], "-o", output, "--arch", "swinunetr"], output,
                   "--arch swinunetr", "unet backbone")


def test_a_truncated_file_is_one_error_line(unet_release, tmp_path):
    data = unet_release[0].read_bytes()
    source = tmp_path / "truncated.pth"
    source.write_bytes(data[:len(data) // 2])
    output = tmp_path / "out" / "model.ckpt"
    output.parent.mkdir()
    assert_refused(["import-weights", source, "-o", output], output, str(source), "damaged or truncated")
    assert_refused(["import-weights", tmp_path / "absent.pth", "-o", output], output, "absent.pth: file not found")


def test_a_file_that_would_run_code_is_refused_before_any_of_it_runs(unet_release, tmp_path):
    marker = tmp_path / "marker"
    source = tmp_path / "planted.pth"
    torch.save({"net": unet_release[1], "epoch": Payload(marker)}, source)
    output = tmp_path / "out" / "model.ckpt"
    output.parent.mkdir()
    assert_refused(["import-weights", source, "-o", output], output, "refused", ".system")
    assert not marker.exists()
    torch.save(Payload(marker), tmp_path / "txt_encoding.pth")
    assert_refused(["import-weights", unet_release[0], "-o", output, "--text-embeddings",
                    tmp_path / "txt_encoding.pth"], output, "refused")
    assert not marker.exists()


# -- what the checkpoint records, and reading it back ------------------------------------------------
def test_info_describes_an_imported_checkpoint(unet_release, unet_ckpt):
    source, _ = unet_release
    code, out, err = run(["info", unet_ckpt])
    assert code == 0, err
    params = sum(int(np.prod(shape)) for _, shape, _, kind in read_table("universal_unet_released_ckpt_expected")
                 if kind == "param")
    assert f"genesis_unet backbone (pooled_global=False), original head, {params:,} parameters" in out
    assert "windows run one per forward" in out
    assert "text encoder: openai/clip-vit-base-patch32" in out
    assert "preprocessing: RAS, spacing 1.5 x 1.5 x 1.5 mm, HU [-175, 250] -> [0, 1], window 96 x 96 x 96, " \
           "overlap 0.5" in out
    assert f"imported from {source.name} (sha256 {hashlib.sha256(source.read_bytes()).hexdigest()})" in out
    assert "licence:" in out and "classes (32):" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    assert [row[1] for row in rows] == ClassCatalog.builtin().names
    assert all(" ".join(row[3:]) == "imported, built-in entry" for row in rows)


def test_both_tools_are_reachable_from_the_clipseg3d_command(unet_ckpt, capsys):
    from clipseg3d.cli.main import main

    assert main(["info", str(unet_ckpt)]) == 0
    assert "provenance: imported from clip_driven_universal_unet.pth" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:
        main(["import-weights", "--help"])
    assert exit.value.code == 0 and capsys.readouterr().out.startswith("usage: clipseg3d import-weights ")


def test_info_refuses_what_is_not_a_checkpoint(unet_release):
    code, out, err = run(["info", unet_release[0]])
    assert code == 1 and out == "" and "not a clipseg3d checkpoint" in err and len(err.strip().splitlines()) == 1


# -- segment --ckpt FILE.pth: imported in memory --------------------------------------------------------
def imported_notes(source: Path, stderr: str) -> list[str]:
    """The lines of ``stderr`` that say ``source`` was imported in memory."""
    start = f"note: {source}: released weights imported in memory (unet, "
    return [line for line in stderr.splitlines() if line.startswith(start) and line.endswith(
        ", 32 classes); clipseg3d import-weights saves them as a checkpoint")]


def test_segment_runs_released_weights_on_the_real_ct_and_writes_every_output(unet_release, tmp_path):
    ct = shared_data("totalseg-case") / "ct.nii.gz"
    source, _ = unet_release
    classes = ["spleen", "right_kidney", "liver", "liver_tumor"]  # in the model's order
    code, _, err = run(["segment", ct, "--ckpt", source, "-o", tmp_path, "--roi", 64, 64, 64, "--overlap", 0,
                        "--probabilities", "--all-masks", "--classes", *classes])
    assert code == 0, err
    assert len(imported_notes(source, err)) == 1
    folder = tmp_path / "ct"
    written = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    assert written == {"labels.nii.gz", "classes.json", "report.json", "overlay.png",
                       *(f"masks/{name}.nii.gz" for name in classes),
                       *(f"probabilities/{name}.nii.gz" for name in classes)}
    scan, labels = nib.load(ct), nib.load(folder / "labels.nii.gz")
    assert labels.shape == scan.shape and np.allclose(labels.affine, scan.affine, atol=1e-4)
    record = read_record(folder)
    assert record["checkpoint_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["class_names"] == classes and record["settings"]["roi_size"] == [64, 64, 64]
