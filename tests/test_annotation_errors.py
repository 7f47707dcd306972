"""Malformed annotation files name the file and the key; duplicate ids are errors; an image that fails to decode
names its path; an empty category list is an error; COCO-style (non-contiguous) category ids train and evaluate
end to end through `ltk train` and `ltk eval`."""
import json
import os
import re
import shutil

import pytest

from ltkernels.models.cli import main as ltk
from ltkernels.models.data.lvis import LVISDetection, LVISFormatError
from ltkernels.models.data.synthetic import write_synthetic_lvis


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_lvis(str(tmp_path_factory.mktemp("synth")), num_classes=6, num_train_images=16,
                                num_val_images=6, image_size=(64, 64), seed=1)


def edited(data, tmp_path, edit, name="ann.json"):
    ann = json.load(open(data["train_ann"]))
    edit(ann)
    path = tmp_path / name
    path.write_text(json.dumps(ann))
    return str(path)


@pytest.mark.parametrize("edit,message", [
    (lambda a: a["images"][3].update(id="abc"), "images[3].id must be an integer, got 'abc'"),
    (lambda a: a["categories"][2].update(id=None), "categories[2].id must be an integer, got None"),
    (lambda a: a["categories"][1].update(instance_count="many"),
     "categories[1].instance_count must be an integer, got 'many'"),
    (lambda a: a["images"].append(dict(a["images"][0])), "duplicate image id"),
    (lambda a: a["annotations"].append(dict(a["annotations"][0])), "duplicate annotation id"),
    (lambda a: a.update(categories=[]), "'categories' is empty"),
])
def test_malformed_values_name_file_and_key(data, tmp_path, edit, message):
    path = edited(data, tmp_path, edit)
    with pytest.raises(LVISFormatError) as err:
        LVISDetection(path, data["image_root"])
    assert path in str(err.value) and message in str(err.value)


def test_malformed_file_through_the_cli_is_one_line(data, tmp_path, capsys):
    path = edited(data, tmp_path, lambda a: a["images"][0].update(id="abc"))
    assert ltk(["train", "--ann", path, "--images", data["image_root"], "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "images[0].id" in err and len(err.strip().splitlines()) == 1


def test_truncated_image_names_its_path(data, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(data["image_root"], root)
    ds = LVISDetection(data["train_ann"], str(root))
    path = ds.image_path(0)
    with open(path, "rb") as f:
        head = f.read(200)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(OSError, match=re.escape(path)):
        ds[0]
    ds[1]  # the others still load


def test_coco_style_category_ids_train_and_evaluate(data, tmp_path, capsys):
    """Category ids 5, 8, 11, ... : labels 1..C inside the model, ids again in the results."""
    def remap(ann):
        new = {c["id"]: 3 * c["id"] + 2 for c in ann["categories"]}
        for c in ann["categories"]:
            c["id"] = new[c["id"]]
        for a in ann["annotations"]:
            a["category_id"] = new[a["category_id"]]
        for im in ann["images"]:
            for key in ("neg_category_ids", "not_exhaustive_category_ids"):
                im[key] = [new[c] for c in im.get(key, [])]
    train_ann = edited(data, tmp_path, remap, "train.json")
    val = json.load(open(data["val_ann"]))
    remap(val)
    val_ann = tmp_path / "val.json"
    val_ann.write_text(json.dumps(val))
    out = str(tmp_path / "run")
    assert ltk(["train", "--config", "one_stage_focal", "--ann", train_ann, "--images", data["image_root"],
                "--val-ann", str(val_ann), "--out", out, "--max-iter", "2", "--batch-size", "4",
                "--set", "data.min_size=64", "--set", "data.max_size=64"]) == 0
    assert "APr" in capsys.readouterr().out
    assert ltk(["eval", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--ann", str(val_ann),
                "--images", data["image_root"], "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "APr" in printed and "AP4 n/a" in printed
    per_class = json.load(open(tmp_path / "eval" / "metrics.json"))["per_class_ap"]
    assert {int(k) for k in per_class} <= {3 * c + 2 for c in range(1, 7)}


def test_eval_with_wrong_images_dir_fails(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert ltk(["train", "--config", "one_stage_focal", "--ann", data["train_ann"], "--images", data["image_root"],
                "--out", out, "--max-iter", "1", "--batch-size", "4", "--no-eval",
                "--set", "data.min_size=64", "--set", "data.max_size=64"]) == 0
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    assert ltk(["eval", "--checkpoint", os.path.join(out, "checkpoint.pt"), "--ann", data["val_ann"],
                "--images", str(wrong)]) == 2
    assert "none of the 6 images" in capsys.readouterr().err
