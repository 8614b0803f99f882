"""The instance, multi-label, image-only and non-ESRI formats, end to end and on hand-made chips.

Most exports use one hand-made scene whose pixel boxes, areas and masks are
computed by hand or by rasterizing the source features independently.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import yaml
from affine import Affine
from conftest import KAMPALA_BUILDINGS, KAMPALA_IMAGE, textured
from labels_io import chip_ids
from rasterio.features import rasterize
from shapely.geometry import MultiPolygon, Polygon

import chipflow
from chipflow.encode import ChipEncoder
from chipflow.formats import ChipLabel, get
from chipflow.labels import ClassInfo

T = Affine(2.0, 0, 500000.0, 0, -2.0, 4000000.0)  # 2 m pixels, EPSG:32633
ROOF, POOL = 3, 7
POOL_NAME = "../pool"  # not a safe folder name: written as ".._pool"
POOL_DIR = ".._pool"


def px(coords, holes=()) -> Polygon:
    """A polygon given in raster pixels (col, row), placed in map coordinates with ``T``."""
    return Polygon([T * c for c in coords], [[T * c for c in h] for h in holes])


def rect(x0, y0, x1, y1) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# A 512 x 512 raster cut into 4 chips of 256 (stride 256): chip id = row * 2 + col.
SCENE = gpd.GeoDataFrame(
    {"Value": [ROOF, ROOF, POOL, ROOF, POOL, ROOF],
     "ClassName": ["roof", "roof", POOL_NAME, "roof", POOL_NAME, "roof"]},
    geometry=[
        px(rect(20, 20, 60, 50)),  # A: chip 0
        px(rect(100, 100, 140, 120)),  # B: chip 0
        px([(200, 10), (300, 10), (200, 60)]),  # D: triangle cut by x = 256 (chips 0 and 1)
        px(rect(20, 300, 120, 400), [rect(50, 330, 90, 370)]),  # E: chip 2, with a hole
        MultiPolygon([px(rect(300, 300, 320, 320)), px(rect(400, 400, 440, 430))]),  # F: chip 3
        px(rect(300.1, 100.1, 300.4, 100.4)),  # G: chip 1, covers no pixel centre
    ],
    crs="EPSG:32633",
)


@pytest.fixture
def scene_raster(make_raster) -> Path:
    return make_raster(textured((3, 512, 512)))


def export(raster, out, metadata_format, client, data=SCENE, **kw) -> chipflow.ExportResult:
    kw.setdefault("stride_x", 256)
    kw.setdefault("stride_y", 256)
    return chipflow.export_training_data(raster, out, data, metadata_format=metadata_format,
                                         client=client, **kw)


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def chip_grid(image: Path) -> tuple[Affine, tuple[int, int]]:
    with rasterio.open(image) as ds:
        return ds.transform, (ds.height, ds.width)


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def burn(geoms, values, image: Path) -> np.ndarray:
    """Independent rasterization of map-space features on a chip's grid (pixel centres)."""
    transform, shape = chip_grid(image)
    return rasterize(list(zip(geoms, values, strict=True)), out_shape=shape, transform=transform,
                     fill=0, dtype="uint16")


def expected_instances(image: Path, value: int, frame=SCENE) -> np.ndarray:
    """Ids 1..k to the class's features in input order, skipping those without a pixel."""
    out = np.zeros(chip_grid(image)[1], np.uint16)
    k = 0
    for geom in frame.geometry[frame["Value"] == value]:
        alone = burn([geom], [1], image).astype(bool)
        if alone.any():
            k += 1
            out[alone] = k
    return out


def metadata(out: Path) -> tuple[dict, dict]:
    return (json.loads((out / "esri_model_definition.emd").read_text()),
            json.loads((out / "esri_accumulated_stats.json").read_text()))


def check_common_metadata(out: Path, fmt: str, n_chips: int, ext: str = "tif") -> tuple[dict, dict]:
    emd, stats = metadata(out)
    assert emd["MetaDataMode"] == stats["MetaDataMode"] == fmt
    assert stats["NumTiles"] == n_chips == len(chip_ids(out, ext))
    # formats with a folder per class name the class as its folder, which the consumer looks up by Name
    pool = POOL_DIR if get(fmt).class_folders else POOL_NAME
    assert [(c["Value"], c["Name"]) for c in emd["Classes"]] == [(ROOF, "roof"), (POOL, pool)]
    assert [(c["ClassValue"], c["ClassName"]) for c in stats["Classes"]] == [(ROOF, "roof"), (POOL, pool)]
    return emd, stats


def export_renamed(*args, **kw) -> chipflow.ExportResult:
    """:func:`export` of a format with class folders: the unsafe class name is renamed, with a warning."""
    with pytest.warns(chipflow.ChipflowWarning, match=r"class '\.\./pool' .* '\.\._pool'"):
        return export(*args, **kw)


def map_lines(out: Path) -> list[str]:
    return (out / "map.txt").read_text().splitlines(keepends=True)


# --------------------------------------------------------------------------- RCNN_Masks


def test_rcnn_masks_hold_the_rasterized_instances_per_class_folder(client, scene_raster, tmp_path):
    out = tmp_path / "rcnn"
    export_renamed(scene_raster, out, "rcnn_masks", client)
    emd, stats = check_common_metadata(out, "RCNN_Masks", 4)
    # every class folder is a class Name of the emd: arcgis.learn finds the masks by it
    assert {rel.split("/")[0] for rel in files_under(out / "labels")} <= {c["Name"] for c in emd["Classes"]}
    # G (chip 1) covers no pixel centre: no roof instance there, so no roof file for chip 1.
    assert files_under(out / "labels") == {
        "roof/000000000.tif", f"{POOL_DIR}/000000000.tif", f"{POOL_DIR}/000000001.tif",
        "roof/000000002.tif", f"{POOL_DIR}/000000003.tif",
    }
    assert not (tmp_path / "pool").exists() and not (out / "pool").exists()  # "../pool" did not escape
    for rel in files_under(out / "labels"):
        folder, name = rel.split("/")
        image = out / "images" / name
        with rasterio.open(out / "labels" / rel) as lab, rasterio.open(image) as img:
            mask = lab.read(1)
            assert lab.count == 1 and mask.dtype == np.uint8
            assert lab.transform == img.transform and lab.crs == img.crs  # georeferenced like the chip
        value = ROOF if folder == "roof" else POOL
        np.testing.assert_array_equal(mask, expected_instances(image, value))
    with rasterio.open(out / "labels" / "roof" / "000000000.tif") as lab:
        roof = lab.read(1)
    assert (roof[20:50, 20:60] == 1).all() and (roof[100:120, 100:140] == 2).all()  # A then B
    assert roof.sum() == 30 * 40 + 2 * 20 * 40
    # map.txt names each chip's first class's mask.
    assert map_lines(out) == [
        "images\\000000000.tif  labels\\roof\\000000000.tif \n",
        f"images\\000000001.tif  labels\\{POOL_DIR}\\000000001.tif \n",
        "images\\000000002.tif  labels\\roof\\000000002.tif \n",
        f"images\\000000003.tif  labels\\{POOL_DIR}\\000000003.tif \n",
    ]
    # Features: roof A, B, E, G; pool D twice (cut by a chip edge), F. G has no pixel, so no instance:
    # the statistics count the instances the masks hold.
    assert stats["FeatureStats"]["NumFeaturesPerClass"] == [3, 3]
    fmt, counts = get("RCNN_Masks"), {ROOF: 0, POOL: 0}
    for stem in ("000000000", "000000001", "000000002", "000000003"):
        for rel in fmt.label_paths(stem, "tif", emd["Classes"]):
            if (out / rel).exists():
                for v, n in fmt.count((out / rel).read_bytes(), width=256, height=256, path=rel,
                                      classes=emd["Classes"]).items():
                    counts[v] += n
    assert counts == {ROOF: 3, POOL: 3}


def test_rcnn_a_chip_whose_only_feature_has_no_pixel_is_not_written(client, scene_raster, tmp_path):
    """With ONLY_TILES_WITH_FEATURES: it would hold no mask, and arcgis.learn drops such a chip."""
    out = tmp_path / "rcnn"
    r = export(scene_raster, out, "RCNN_Masks", client, data=SCENE.iloc[[3, 5]])  # E (chip 2), G (chip 1)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000002.tif"]
    assert r.features_per_class == {"roof": 1}


def _chip(n_features: int, instances: np.ndarray, class_index, classes, **kw) -> ChipLabel:
    enc = ChipEncoder("tif", rasterio.crs.CRS.from_epsg(32633).to_wkt())
    return ChipLabel(
        stem="000000005", image_name="000000005.tif", width=instances.shape[1], height=instances.shape[0],
        depth=3, values=np.array([classes[k].value for k in class_index], np.int64),
        boxes=np.zeros((n_features, 4)), class_index=np.asarray(class_index, np.int64), classes=classes,
        instances=instances, encode_raster=lambda m: enc.label(m, T), **kw)


def test_rcnn_map_txt_starts_with_a_chip_that_has_a_mask(client, scene_raster, tmp_path):
    """arcgis.learn takes the label extension from the last column of map.txt's first line."""
    out = tmp_path / "rcnn"
    export(scene_raster, out, "RCNN_Masks", client, data=SCENE.iloc[[3]], image_chip_format="JPEG",
           output_nofeature_tiles="ALL_TILES")  # roof E alone, in chip 2
    assert map_lines(out) == [
        "images\\000000002.jpg  labels\\roof\\000000002.png \n",  # not chip 0's line without a mask
        "images\\000000000.jpg \n",
        "images\\000000001.jpg \n",
        "images\\000000003.jpg \n",
    ]


def test_rcnn_classes_sharing_a_folder_fail_before_anything_is_written(client, scene_raster, tmp_path):
    clash = SCENE.assign(ClassName=SCENE["ClassName"].replace({"roof": ".._pool"}))  # "../pool"'s folder
    with pytest.raises(chipflow.InvalidParameterError, match=r"in_class_data=.*would be written alike in the labels"):
        export(scene_raster, tmp_path / "rcnn", "RCNN_Masks", client, data=clash)
    assert not (tmp_path / "rcnn").exists()


def test_rcnn_masks_switch_to_uint16_past_255_instances_and_number_them_in_order():
    classes = (ClassInfo(1, "a", (1, 2, 3)), ClassInfo(2, "b", (1, 2, 3)))
    n = 300
    inst = np.zeros((20, 20), np.uint32)
    inst.ravel()[:n] = np.arange(1, n + 1)  # feature p at pixel p - 1
    class_index = [0] * 299 + [1]  # the last feature is class b
    files = get("RCNN_Masks").files(_chip(n, inst, class_index, classes), "tif")
    assert [rel for rel, _ in files] == ["labels/a/000000005.tif", "labels/b/000000005.tif"]
    with rasterio.io.MemoryFile(files[0][1]) as mem, mem.open() as ds:
        a = ds.read(1)
    assert a.dtype == np.uint16 and a.ravel()[:299].tolist() == list(range(1, 300)) and a.ravel()[299] == 0
    with rasterio.io.MemoryFile(files[1][1]) as mem, mem.open() as ds:
        b = ds.read(1)
    assert b.dtype == np.uint8 and b.ravel()[299] == 1 and b.sum() == 1
    fmt = get("RCNN_Masks")
    assert fmt.count(files[0][1], width=20, height=20, path=files[0][0], classes=classes) == {1: 299}
    with pytest.raises(ValueError, match="folder"):
        fmt.count(files[0][1], width=20, height=20)  # the file alone has no class
    with pytest.raises(ValueError, match="would be written alike"):
        get("RCNN_Masks").files(_chip(n, inst, class_index, (ClassInfo(1, "a/b", (0, 0, 0)),
                                                            ClassInfo(2, "a_b", (0, 0, 0)))), "tif")


def test_rcnn_mask_count_rejects_gaps_in_instance_ids():
    enc = ChipEncoder("tif", rasterio.crs.CRS.from_epsg(32633).to_wkt())
    mask = np.zeros((8, 8), np.uint8)
    mask[0, 0], mask[1, 1] = 1, 3
    classes = (ClassInfo(1, "a", (0, 0, 0)),)
    with pytest.raises(ValueError, match="1..k"):
        get("RCNN_Masks").count(enc.label(mask, T), width=8, height=8, path="labels/a/x.tif", classes=classes)


# --------------------------------------------------------------------------- Panoptic_Segmentation


def test_panoptic_writes_class_raster_and_instance_masks(client, scene_raster, tmp_path):
    out = tmp_path / "panoptic"
    export_renamed(scene_raster, out, "Panoptic_Segmentation", client, image_chip_format="PNG")
    emd, stats = check_common_metadata(out, "Panoptic_Segmentation", 4, "png")
    assert files_under(out / "labels") == {f"00000000{i}.png" for i in range(4)}
    assert files_under(out / "labels2") == {
        "roof/000000000.png", f"{POOL_DIR}/000000000.png", f"{POOL_DIR}/000000001.png",
        "roof/000000002.png", f"{POOL_DIR}/000000003.png",
    }
    pixels = {ROOF: 0, POOL: 0}
    for i in range(4):
        image = out / "images" / f"00000000{i}.png"
        semantic = read_png(out / "labels" / f"00000000{i}.png")
        np.testing.assert_array_equal(semantic, burn(SCENE.geometry, SCENE["Value"], image))
        for v, n in get("Panoptic_Segmentation").count(
                (out / "labels" / f"00000000{i}.png").read_bytes(), width=256, height=256).items():
            pixels[v] += n
    for rel in files_under(out / "labels2"):
        folder, name = rel.split("/")
        mask = read_png(out / "labels2" / rel)
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(
            mask, expected_instances(out / "images" / name, ROOF if folder == "roof" else POOL))
    assert map_lines(out)[0] == "images\\000000000.png  labels\\000000000.png \n"
    assert stats["ClassPixelStats"]["NumPixelsPerClass"] == [pixels[ROOF], pixels[POOL]]
    assert pixels[ROOF] == 40 * 30 + 40 * 20 + 100 * 100 - 40 * 40  # A + B + E (holed); G none
    assert emd["Panoptic_Segmentation_Instance_Classes"] == [
        {"Value": ROOF, "Name": "roof"}, {"Value": POOL, "Name": POOL_DIR}]
    assert {rel.split("/")[0] for rel in files_under(out / "labels2")} == {"roof", POOL_DIR}


def test_panoptic_emd_extra_lists_every_class():
    classes = (ClassInfo(2, "tree", (0, 0, 0)), ClassInfo(5, "car", (0, 0, 0)))
    assert get("Panoptic_Segmentation").emd_extra(classes) == {
        "Panoptic_Segmentation_Instance_Classes": [{"Value": 2, "Name": "tree"}, {"Value": 5, "Name": "car"}]}


# --------------------------------------------------------------------------- MultiLabeled_Tiles


def test_multilabeled_tiles_name_the_classes_of_each_chip(client, scene_raster, tmp_path):
    import xml.etree.ElementTree as ET

    out = tmp_path / "multi"
    export(scene_raster, out, "MultiLabeled_Tiles", client)
    emd, stats = check_common_metadata(out, "MultiLabeled_Tiles", 4)
    expected = {0: f"roof,{POOL_NAME}", 1: f"roof,{POOL_NAME}", 2: "roof", 3: POOL_NAME}  # G is a roof
    fmt, counts = get("MultiLabeled_Tiles"), {ROOF: 0, POOL: 0}
    for i, names in expected.items():
        path = out / "labels" / f"00000000{i}.xml"
        root = ET.parse(path).getroot()
        objects = root.findall("object")
        assert len(objects) == 1
        assert objects[0].findtext("name") == names  # names, by class value, comma-separated
        box = objects[0].find("bndbox")
        assert [box.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")] == ["0.00", "0.00", "256.00",
                                                                             "256.00"]
        assert root.findtext("filename") == f"00000000{i}.tif" and root.findtext("size/depth") == "3"
        for v, n in fmt.count(path.read_bytes(), width=256, height=256, classes=emd["Classes"]).items():
            counts[v] += n
    assert map_lines(out)[1] == "images\\000000001.tif  labels\\000000001.xml \n"
    assert stats["FeatureStats"]["NumImagesPerClass"] == [counts[ROOF], counts[POOL]] == [3, 3]
    with pytest.raises(ValueError, match="classes"):
        fmt.count((out / "labels" / "000000000.xml").read_bytes(), width=256, height=256)


def test_multilabeled_commas_in_class_names_cannot_split_a_label():
    classes = (ClassInfo(1, "trees, shrubs", (0, 0, 0)), ClassInfo(2, "a&b", (0, 0, 0)))
    chip = ChipLabel(stem="000000000", image_name="000000000.tif", width=64, height=32, depth=1,
                     values=np.array([2, 1, 2]), boxes=np.zeros((3, 4)), class_index=np.array([1, 0, 1]),
                     classes=classes)
    fmt = get("MultiLabeled_Tiles")
    data = fmt.encode(chip)
    assert b"<name>trees_ shrubs,a&amp;b</name>" in data and b"<xmax>64.00</xmax>" in data
    assert fmt.count(data, width=64, height=32, classes=classes) == {1: 1, 2: 1}
    empty = fmt.encode(ChipLabel(stem="0", image_name="0.tif", width=64, height=32, depth=1,
                                 values=np.zeros(0, int), boxes=np.zeros((0, 4)),
                                 class_index=np.zeros(0, int), classes=classes))
    assert b"<object>" not in empty and fmt.count(empty, width=64, height=32, classes=classes) == {}


def test_multilabeled_class_names_are_written_as_in_the_emd_and_may_not_collide(client, scene_raster, tmp_path):
    """A comma in a name is renamed (with a warning) so that the emd names what the labels hold;
    two classes written alike are refused before anything is written (validate would call it INVALID)."""
    from chipflow.validate import validate_dataset

    comma = SCENE.assign(ClassName=SCENE["ClassName"].replace({"roof": "roof, flat"}))
    out = tmp_path / "comma"
    with pytest.warns(chipflow.ChipflowWarning, match=r"class 'roof, flat' is renamed 'roof_ flat'"):
        r = export(scene_raster, out, "MultiLabeled_Tiles", client, data=comma)
    emd, _ = metadata(out)
    assert [c["Name"] for c in emd["Classes"]] == ["roof_ flat", POOL_NAME] and "roof_ flat" in r.features_per_class
    assert validate_dataset(str(out)).ok
    for names in (["car", "car"], ["a,b", "a_b"]):
        same = SCENE.assign(ClassName=SCENE["Value"].map({ROOF: names[0], POOL: names[1]}))
        with pytest.raises(chipflow.InvalidParameterError,
                           match=rf"in_class_data=.*classes '{names[0]}' and '{names[1]}' would be written "
                                 r"alike in the labels"):
            export(scene_raster, tmp_path / "same", "MultiLabeled_Tiles", client, data=same)
    assert not (tmp_path / "same").exists()


# --------------------------------------------------------------------------- Export_Tiles


def test_export_tiles_writes_images_only(client, scene_raster, tmp_path):
    out = tmp_path / "tiles"
    r = export(scene_raster, out, "export_tiles", client, output_nofeature_tiles="ALL_TILES")
    assert r.num_chips == 4
    emd, stats = check_common_metadata(out, "Export_Tiles", 4)
    assert stats["OutputFeatures"] is False
    # The consumer reads Export_Tiles plus a labels/ folder as Pix2Pix: none may exist.
    assert not (out / "labels").exists() and not (out / "images2").exists()
    assert {p.name for p in out.iterdir()} == {
        "images", ".chipflow", "map.txt", "stats.txt", "esri_model_definition.emd",
        "esri_accumulated_stats.json", "chips.parquet"}
    assert files_under(out / "images") == {f"00000000{i}.tif" for i in range(4)}
    assert map_lines(out) == [f"images\\00000000{i}.tif \n" for i in range(4)]


# --------------------------------------------------------------------------- COCO


# pycocotools' Cython decoder trips numpy 2's copy-keyword DeprecationWarning.
coco_warning = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def _coco(out: Path):
    from pycocotools.coco import COCO

    return COCO(str(out / "annotations.json"))


def _seg_polygons(ann) -> list[Polygon]:
    return [Polygon(np.reshape(p, (-1, 2))) for p in ann["segmentation"]]


@coco_warning
def test_coco_annotations_hand_computed(client, scene_raster, tmp_path):
    out = tmp_path / "coco"
    export(scene_raster, out, "COCO", client)
    check_common_metadata(out, "COCO", 4)
    coco = _coco(out)
    raw = json.loads((out / "annotations.json").read_text())
    assert set(raw) == {"info", "licenses", "images", "annotations", "categories"}
    assert raw["categories"] == [{"id": ROOF, "name": "roof", "supercategory": ""},
                                 {"id": POOL, "name": POOL_NAME, "supercategory": ""}]
    assert sorted(coco.getImgIds()) == [0, 1, 2, 3]
    for img in raw["images"]:
        assert img["file_name"] == f"images/{img['id']:09d}.tif" and (out / img["file_name"]).exists()
        assert (img["width"], img["height"]) == (256, 256)
    assert [a["id"] for a in raw["annotations"]] == list(range(1, 8))  # A B D | D G | E | F
    assert all(a["iscrowd"] == 0 for a in raw["annotations"])
    by_image = {i: coco.loadAnns(coco.getAnnIds(imgIds=[i])) for i in range(4)}
    a, b, d0 = by_image[0]
    assert (a["category_id"], a["bbox"], a["area"]) == (ROOF, [20, 20, 40, 30], 1200)
    assert a["segmentation"] == [[20, 20, 60, 20, 60, 50, 20, 50]]
    assert (b["bbox"], b["area"]) == ([100, 100, 40, 20], 800)
    # D's part left of x = 256: (200,10) (256,10) (256,32) (200,60); area 2500 - 484.
    assert (d0["category_id"], d0["bbox"], d0["area"]) == (POOL, [200, 10, 56, 50], 2016)
    [left] = _seg_polygons(d0)
    assert left.equals(Polygon([(200, 10), (256, 10), (256, 32), (200, 60)]))
    d1, g = by_image[1]
    assert (d1["bbox"], d1["area"]) == ([0, 10, 44, 22], 484)
    assert _seg_polygons(d1)[0].equals(Polygon([(0, 10), (44, 10), (0, 32)]))
    assert g["bbox"] == pytest.approx([44.1, 100.1, 0.3, 0.3]) and g["area"] == pytest.approx(0.09)
    [e] = by_image[2]  # a hole: uncompressed RLE, read back by pycocotools exactly
    assert (e["bbox"], e["area"]) == ([20, 44, 100, 100], 100 * 100 - 40 * 40)
    assert set(e["segmentation"]) == {"size", "counts"} and e["segmentation"]["size"] == [256, 256]
    image = out / "images" / "000000002.tif"
    np.testing.assert_array_equal(coco.annToMask(e), burn([SCENE.geometry[3]], [1], image))
    [f] = by_image[3]
    assert (f["bbox"], f["area"]) == ([44, 44, 140, 130], 400 + 1200) and len(f["segmentation"]) == 2
    np.testing.assert_array_equal(coco.annToMask(f), burn([SCENE.geometry[4]], [1], out / "images" / "000000003.tif"))
    np.testing.assert_array_equal(coco.annToMask(a), burn([SCENE.geometry[0]], [1], out / "images" / "000000000.tif"))
    # Images only in map.txt (one column), no per-chip label files.
    assert map_lines(out)[0] == "images\\000000000.tif \n" and files_under(out / "labels") == set()
    emd, stats = metadata(out)
    counts = get("COCO").count((out / "annotations.json").read_bytes(), width=256, height=256)
    assert stats["FeatureStats"]["NumFeaturesPerClass"] == [counts[ROOF], counts[POOL]] == [4, 3]


@coco_warning
def test_coco_masks_match_reprojected_source_buildings(client, tmp_path):
    """Kampala (EPSG:4326 buildings over an EPSG:3857 image): annToMask vs an independent rasterization."""
    out = tmp_path / "kampala_coco"
    export(KAMPALA_IMAGE, out, "COCO", client, data=str(KAMPALA_BUILDINGS))
    coco = _coco(out)
    with rasterio.open(KAMPALA_IMAGE) as ds:
        buildings = gpd.read_file(KAMPALA_BUILDINGS).to_crs(ds.crs)
    checked = 0
    for img in coco.loadImgs(coco.getImgIds()):
        image = out / img["file_name"]
        transform, shape = chip_grid(image)
        x0, y1 = transform * (0, 0)
        x1, y0 = transform * shape[::-1]
        near = buildings[buildings.intersects(shapely.box(x0, y0, x1, y1))]
        burnt = [burn([g], [1], image).astype(bool) for g in near.geometry]
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            if ann["area"] < 150:
                continue
            mask = coco.annToMask(ann).astype(bool)
            ious = [(mask & m).sum() / (mask | m).sum() for m in burnt]
            assert max(ious) > 0.98, (img["id"], ann["id"], max(ious))
            checked += 1
    assert checked >= 20


@coco_warning
def test_coco_rle_is_column_major_and_starts_with_zeros():
    from pycocotools import mask as mask_utils

    from chipflow.formats.coco import rle_encode

    m = np.zeros((5, 7), np.uint8)
    m[1:4, 2:6] = 1
    m[0, 0] = 1
    rle = rle_encode(m)
    assert rle["counts"][0] == 0  # starts with a one: zero zeros first
    decoded = mask_utils.decode(mask_utils.frPyObjects(rle, 5, 7))
    np.testing.assert_array_equal(decoded, m)


# --------------------------------------------------------------------------- YOLO


def test_yolo_rows_are_hand_normalised_boxes(client, scene_raster, tmp_path):
    out = tmp_path / "yolo"
    export(scene_raster, out, "YOLO", client)
    emd, stats = check_common_metadata(out, "YOLO", 4)
    assert (out / "labels" / "000000000.txt").read_text() == (
        "0 0.156250 0.136719 0.156250 0.117188\n"  # A (20,20)-(60,50): 40/256, 35/256, 40/256, 30/256
        "0 0.468750 0.429688 0.156250 0.078125\n"  # B (100,100)-(140,120)
        "1 0.890625 0.136719 0.218750 0.195312\n"  # D's left part (200,10)-(256,60)
    )
    assert (out / "labels" / "000000003.txt").read_text() == "1 0.445312 0.425781 0.546875 0.507812\n"
    assert yaml.safe_load((out / "data.yaml").read_text()) == {
        "train": "images", "val": "images", "names": {0: "roof", 1: POOL_NAME}}
    assert map_lines(out)[0] == "images\\000000000.tif  labels\\000000000.txt \n"
    fmt, counts = get("YOLO"), {ROOF: 0, POOL: 0}
    for i in range(4):
        for v, n in fmt.count((out / "labels" / f"00000000{i}.txt").read_bytes(), width=256, height=256,
                              classes=emd["Classes"]).items():
            counts[v] += n
    assert stats["FeatureStats"]["NumFeaturesPerClass"] == [counts[ROOF], counts[POOL]] == [4, 3]
    with pytest.raises(ValueError, match="classes"):
        fmt.count(b"0 0.5 0.5 0.1 0.1\n", width=256, height=256)


def test_yolo_segmentation_rows_are_normalised_polygons(client, scene_raster, tmp_path):
    out = tmp_path / "yoloseg"
    export(scene_raster, out, "YOLO_segmentation", client)
    emd, stats = check_common_metadata(out, "YOLO_segmentation", 4)
    rows = (out / "labels" / "000000000.txt").read_text().splitlines()
    assert rows[0] == "0 0.078125 0.078125 0.234375 0.078125 0.234375 0.195312 0.078125 0.195312"  # A
    cls, *xy = rows[2].split()  # D's left part, vertex order as shapely clips it
    got = Polygon(np.reshape([float(v) * 256 for v in xy], (-1, 2)))
    expected = Polygon([(200, 10), (256, 10), (256, 32), (200, 60)])
    assert cls == "1" and got.normalize().equals_exact(expected.normalize(), tolerance=1e-3)
    # F: only the larger part, (400,400)-(440,430) → chip 3 pixels (144,144)-(184,174).
    assert (out / "labels" / "000000003.txt").read_text() == (
        "1 0.562500 0.562500 0.718750 0.562500 0.718750 0.679688 0.562500 0.679688\n")
    assert yaml.safe_load((out / "data.yaml").read_text())["names"] == {0: "roof", 1: POOL_NAME}
    fmt = get("YOLO_segmentation")
    counts = {ROOF: 0, POOL: 0}
    for i in range(4):
        for v, n in fmt.count((out / "labels" / f"00000000{i}.txt").read_bytes(), width=256, height=256,
                              classes=emd["Classes"]).items():
            counts[v] += n
    assert stats["FeatureStats"]["NumFeaturesPerClass"] == [counts[ROOF], counts[POOL]] == [4, 3]


def _zm(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """``frame`` with Z and M values on every vertex (ArcGIS's PolygonZM feature classes)."""
    import re

    def zm(wkt: str) -> str:
        wkt = re.sub(r"(-?[\d.]+) (-?[\d.]+)", r"\1 \2 5 7", wkt)
        return wkt.replace("POLYGON (", "POLYGON ZM (").replace("POLYGON ((", "POLYGON ZM ((")

    geoms = shapely.from_wkt([zm(shapely.to_wkt(g, trim=True)) for g in frame.geometry])
    assert shapely.has_z(geoms).all() and shapely.has_m(geoms).all()
    return frame.set_geometry(geoms)


@coco_warning
def test_polygons_with_z_and_m_values_give_the_labels_of_their_2d_shapes(client, scene_raster, tmp_path):
    """Z and M are dropped: COCO polygons and YOLO rows hold x, y pairs (no NaN), as for 2D input."""
    zm = _zm(SCENE)
    import pyogrio  # a PolygonZM shapefile, written as ISO WKB with all four dimensions

    pyogrio.raw.write(str(tmp_path / "zm.shp"), np.array(
        [shapely.to_wkb(g, flavor="iso", output_dimension=4) for g in zm.geometry], dtype=object),
        [zm["Value"].to_numpy(), zm["ClassName"].to_numpy()], ["Value", "ClassName"], driver="ESRI Shapefile",
        geometry_type="Unknown", crs="EPSG:32633", layer_options={"SHPT": "POLYGONZM"})
    for name, files in (("COCO", ["annotations.json"]),
                        ("YOLO_segmentation", [f"labels/00000000{i}.txt" for i in range(4)])):
        export(scene_raster, tmp_path / name, name, client)
        for data, tag in ((zm, "frame"), (str(tmp_path / "zm.shp"), "file")):
            out = tmp_path / f"{name}_{tag}"
            export(scene_raster, out, name, client, data=data)
            for f in files:
                assert (out / f).read_bytes() == (tmp_path / name / f).read_bytes(), (name, tag, f)
    assert len(_coco(tmp_path / "COCO_file").getAnnIds()) == 7


@pytest.mark.parametrize("name", ["PASCAL_VOC_rectangles", "KITTI_rectangles"])
def test_box_rows_are_percent_formatting_to_the_byte(name):
    """Boxes formatted through the table of hundredths read as ``"%.2f" % v`` would: exact ties
    (x.125, x.375: half-even), values a rounding error off a tie, both chip edges, -0.0, NaN and
    values past the table (both formatted as before)."""
    from chipflow.formats.rectangles import _KITTI_ROW, _VOC_OBJECT, _rows

    template = _VOC_OBJECT if name == "PASCAL_VOC_rectangles" else _KITTI_ROW
    rng = np.random.default_rng(11)
    ties = np.arange(0, 25600, 12.5) / 100  # every exact half hundredth below 256
    near = np.concatenate([np.nextafter(ties, 0), np.nextafter(ties, 300), (np.arange(1, 256) + 0.005)])
    cases = [rng.uniform(0, 256, (300, 4)), rng.uniform(0, 256, (5, 4)), np.resize(ties, (len(ties) // 4, 4)),
             np.resize(near, (len(near) // 4, 4)), np.array([[0.0, 0.0, 256.0, 256.0], [1e-9, 0.004999, 0.005, 255.995]]),
             np.array([[-0.0, 0.0, 1.0, 2.0]]), np.array([[np.nan, 0.0, 1.0, 2.0]]), np.array([[0, 0, 9e6, 1.0]]),
             np.zeros((0, 4))]
    every = []
    for boxes in cases:
        values = rng.integers(1, 300, len(boxes))
        chip = ChipLabel(stem="x", image_name="x.tif", width=256, height=256, depth=3, values=values,
                         boxes=boxes, class_index=np.zeros(len(boxes), int), classes=())
        expected = (template * len(boxes)) % tuple(
            v for row in zip(values.tolist(), *boxes.T.tolist(), strict=True) for v in row)
        assert _rows(chip, template) == expected
        every.append((values, boxes, expected))
    # a block's chips rendered at once (the export's path): each chip's text as on its own, in either
    # of the two ways of formatting (one chip's NaN, -0.0 or 9e6 sends the whole block through `%`)
    for chips in (every[:5] + every[-1:], every):
        cuts = np.cumsum([0] + [len(v) for v, _, _ in chips])
        texts = get(name).block_rows(np.concatenate([v for v, _, _ in chips]),
                                     np.concatenate([b for _, b, _ in chips]), cuts)
        assert texts == [expected for _, _, expected in chips]
        label = ChipLabel(stem="x", image_name="x.tif", width=256, height=256, depth=3, values=chips[0][0],
                          boxes=chips[0][1], class_index=np.zeros(len(chips[0][0]), int), rows=texts[0])
        assert get(name).encode(label) == get(name).encode(dataclasses.replace(label, rows=None))
    assert "0.12" in _rows(ChipLabel(stem="x", image_name="x", width=1, height=1, depth=1, values=np.array([1]),
                                     boxes=np.array([[0.125, 0.375, 0.625, 0.875]]), class_index=np.zeros(1, int),
                                     classes=()), template)


def test_coco_annotations_are_joined_part_by_part_into_the_same_bytes_as_one_document():
    """finalize streams the blocks' parts as text; the file is json.dumps of the whole, ids 1..N in order."""
    from chipflow._version import __version__

    parts = [json.dumps({"images": [{"id": 1, "file_name": "a.tif"}],
                          "annotations": [{"image_id": 1, "bbox": [1, 2, 3, 4]}, {"image_id": 1, "bbox": [0, 0, 1, 1]}]}
                         ).encode(),
             b"", json.dumps({"images": [{"id": 2, "file_name": "b.tif"}], "annotations": []}).encode(),
             json.dumps({"images": [], "annotations": []}).encode(),
             json.dumps({"images": [{"id": 3, "file_name": "c.tif"}],
                          "annotations": [{"image_id": 3, "bbox": [5, 5, 1, 1]}]}).encode()]
    classes = (ClassInfo(3, "roof", (0, 0, 0)), ClassInfo(7, "pool", (0, 0, 0)))

    class Put(dict):
        def put(self, name, data):
            self[name] = data

    for given in (parts, [], [b""]):
        written = Put()
        get("COCO").finalize(written, given, classes)
        records = [json.loads(raw) for raw in given if raw]
        annotations = [a for r in records for a in r["annotations"]]
        for i, a in enumerate(annotations, 1):
            a["id"] = i
        whole = {"info": {"description": "Training chips exported by chipflow", "version": __version__},
                 "licenses": [], "images": [i for r in records for i in r["images"]], "annotations": annotations,
                 "categories": [{"id": 3, "name": "roof", "supercategory": ""},
                                {"id": 7, "name": "pool", "supercategory": ""}]}
        assert written["annotations.json"] == json.dumps(whole, separators=(",", ":")).encode()


@pytest.mark.parametrize("name", ["COCO", "YOLO"])
def test_coco_and_yolo_of_images_their_loaders_cannot_open_are_warned_about(tmp_path, name):
    from chipflow.config import check_against_raster

    for count, dtype, warned in ((5, "float32", True), (3, "float32", True), (4, "uint8", False), (3, "uint16", False)):
        cfg = chipflow.config.make_config("in.tif", str(tmp_path / "o"), metadata_format=name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_against_raster(cfg, width=512, height=512, count=count, dtype=dtype)
        said = [str(w.message) for w in caught if issubclass(w.category, chipflow.ChipflowWarning)]
        assert bool(said) == warned, (count, dtype, said)
        if warned:
            assert f"{count} bands of {dtype}" in said[0] and "OpenCV or Pillow" in said[0]
