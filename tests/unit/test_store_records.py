"""The image store's records and tags on plain files, no root: tag, load, untag, remove, prune,
corrupt records, the default store under the data root, and crash safety (a writer killed before
its rename; a live owner's work never swept; a tag never naming an image removed meanwhile).
Layers with owners, devices and xattrs, and the store's privacy, are tests/kernel/test_store.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pytest_sandbox import Image, InvalidSpecError
from pytest_sandbox.core import naming
from pytest_sandbox.core.errors import ImageNotFoundError, LayerNotFoundError
from pytest_sandbox.image import History, ImageConfig
from pytest_sandbox.images.store import ImageRecord, Store
from tests import probes
from tests.layertar_support import text_layer


def test_bad_layer_dirs_are_refused_before_anything_is_created(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    with pytest.raises(LayerNotFoundError):
        st.add_layer_dir(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        st.add_layer_dir(tmp_path / "file")
    with pytest.raises(InvalidSpecError):
        st.add_layer_dir("/")
    assert not (tmp_path / "store").exists()


def test_tag_load_many_tags_untag_remove(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    a, b = text_layer(tmp_path, "a", "A"), text_layer(tmp_path, "b", "B")
    config = ImageConfig(env=(("K", "v"),), workdir="/w", user="1000", cmd=("sh",))
    image = Image((str(a), str(b)), False, config)
    tagged = image.tag("user/app:1", store=st)
    assert tagged.image_id is not None
    assert tagged.store == st
    assert tagged.config == config
    assert tagged.host is False
    assert [os.path.basename(os.path.dirname(p)) for p in tagged.layers] == [
        d[7:] for d in st.get_image(tagged.image_id).layers
    ]
    assert Path(tagged.layers[1], "b.txt").read_text() == "B"
    same = image.tag("user/app:latest", store=st)
    assert same.image_id == tagged.image_id
    image.tag("other", store=st)
    assert st.refs() == {
        "user/app:1": tagged.image_id,
        "user/app:latest": tagged.image_id,
        "other:latest": tagged.image_id,
    }
    loaded = Image.load("user/app", store=st)
    assert loaded == tagged
    assert loaded.image_id == tagged.image_id
    assert Image.load(tagged.image_id, store=st) == tagged
    assert Image.load(f"user/app@{tagged.image_id}", store=st) == tagged
    listed = st.images()
    assert [(s.id, s.refs) for s in listed] == [
        (tagged.image_id, ("other:latest", "user/app:1", "user/app:latest"))
    ]
    record = listed[0].record
    assert record.host_base is False
    assert [h.created_by for h in record.history] == ["layer", "layer"]
    assert st.untag("other") == tagged.image_id
    assert st.remove("user/app:1") == ["user/app:1"]
    assert st.has_image(tagged.image_id)  # one tag left
    assert st.remove("user/app") == ["user/app:latest"]
    assert not st.has_image(tagged.image_id)
    with pytest.raises(ImageNotFoundError, match="no image 'user/app:latest'") as err:
        Image.load("user/app", store=st)
    assert isinstance(err.value, LookupError)
    assert "pull" in err.value.hint


def test_prune_removes_unreferenced_layers_only(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    a, b, c = (text_layer(tmp_path, n, n) for n in "abc")
    Image.from_layers(a, b, base=None, store=st).tag("keep:1")
    drop = Image.from_layers(c, base=None, store=st).tag("drop:1")
    digest_c = st.layer_digest_of(drop.layers[0])
    st.remove("drop:1")
    assert st.prune() == [digest_c]
    assert not os.path.exists(drop.layers[0])
    assert Path(Image.load("keep:1", store=st).layers[1], "b.txt").read_text() == "b"
    assert st.prune() == []
    # a layer is stored again after a prune
    again = Image.from_layers(c, base=None, store=st).tag("drop:2")
    assert Path(again.layers[0], "c.txt").read_text() == "c"


def test_corrupt_record_is_refused(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    image = Image.from_layers(text_layer(tmp_path, "a", "A"), base=None, store=st).tag("x")
    assert image.image_id is not None
    path = tmp_path / "store" / "images" / "sha256" / (image.image_id[7:] + ".json")
    path.write_bytes(path.read_bytes().replace(b'"host_base":false', b'"host_base":true '))
    with pytest.raises(ImageNotFoundError, match="corrupt"):
        Image.load("x", store=st)


def test_record_round_trip_and_id_is_content(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    info = st.add_layer_dir(text_layer(tmp_path, "a", "A"))
    record = ImageRecord(
        layers=(info.digest,),
        config=ImageConfig(env=(("A", "1"),), entrypoint=("/bin/sh", "-c")),
        host_base=True,
        created="2024-01-01T00:00:00Z",
        history=(
            {"created": "2024-01-01T00:00:00Z", "created_by": "x"},
            History(created_by="ENV", empty_layer=True),
        ),  # type: ignore[arg-type]
    )
    image_id = st.put_image(record)
    assert image_id == record.id
    assert st.get_image(image_id) == record
    assert ImageRecord.from_json(json.loads(record.encode())) == record
    with pytest.raises(ImageNotFoundError):
        st.put_image(ImageRecord(layers=("sha256:" + "1" * 64,)))
    with pytest.raises(InvalidSpecError):
        ImageRecord(layers=("sha256:../x",))


def test_default_store_is_under_the_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_sandbox.config import Settings

    assert Store.default(Settings(data_root=str(tmp_path / "data"))).root == str(tmp_path / "data" / "store")
    probes.use_data_root(monkeypatch, str(tmp_path / "data"))
    image = Image.from_layers(text_layer(tmp_path, "a", "A"), base=None).tag("indefault")
    assert image.store == Store(tmp_path / "data" / "store")
    assert Image.load("indefault").image_id == image.image_id


_CRASHER = textwrap.dedent(
    """
    import os, sys
    from pytest_sandbox import Image
    from pytest_sandbox.images.store import Store
    store, layer, where = sys.argv[1:4]
    st = Store(store)
    image = Image.from_layers(layer, base=None, store=st)
    if where == "refs.json":
        image = image.save()  # the layer and the record are stored; the tag's write will die
    real_rename = os.rename

    def die_before_rename(src, dst, *args, **kwargs):
        if where in str(dst):
            os._exit(9)  # as a SIGKILL would: no finally, no cleanup
        return real_rename(src, dst, *args, **kwargs)

    os.rename = die_before_rename
    if where == "refs.json":
        st.tag("crashed:1", image.image_id)
    else:
        st.add_layer_dir(layer)
    """
)


@pytest.mark.parametrize("where", ["refs.json", "layers/sha256"])
def test_a_crash_mid_write_leaves_nothing_visible_and_is_swept(tmp_path: Path, where: str) -> None:
    """A process dies between writing and renaming: nothing half-made is visible, and the next
    user of the store removes its leftovers (they are in its owner directory, not loose)."""
    layer = text_layer(tmp_path, "a", "A" * 100_000)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    root = tmp_path / "store"
    p = subprocess.run([sys.executable, "-c", _CRASHER, str(root), str(layer), where], check=False, env=env)
    assert p.returncode == 9
    leftovers = [q for q in (root / "tmp").rglob("*") if not q.is_dir()]
    assert leftovers, "the crash should have left its work in tmp/"
    st = Store(root)
    assert st.refs() == {}
    if where != "refs.json":
        assert os.listdir(root / "layers" / "sha256") == []
    st.images()  # any use of the store sweeps the dead owner's work
    st.add_layer_dir(text_layer(tmp_path, "b", "B"))
    assert [q.name for q in (root / "tmp").iterdir()] == [naming.owner_tag()]
    assert [q for q in (root / "tmp").rglob("*") if not q.is_dir()] == []


def test_a_live_owners_work_is_never_swept(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        work = tmp_path / "store" / "tmp" / naming.owner_tag(sleeper.pid) / "tmpwork"
        work.mkdir(parents=True)
        (work / "half").write_text("in progress")
        Store(tmp_path / "store").add_layer_dir(text_layer(tmp_path, "a", "A"))
        assert (work / "half").read_text() == "in progress"
    finally:
        sleeper.kill()
        sleeper.wait()
    Store(tmp_path / "store").add_layer_dir(text_layer(tmp_path, "b", "B"))
    assert not work.parent.exists()  # its owner is dead now


def test_a_tag_never_names_an_image_removed_meanwhile(tmp_path: Path) -> None:
    """tag() checks the record under the store lock that remove() and prune() hold to delete it."""
    st = Store(tmp_path / "store")
    image = Image.from_layers(text_layer(tmp_path, "a", "A"), base=None, store=st).save()
    assert image.image_id is not None
    errors: list[BaseException] = []

    def tag() -> None:
        try:
            st.tag("late:1", image.image_id)  # type: ignore[arg-type]
        except ImageNotFoundError as e:
            errors.append(e)

    with probes.store_lock(st):  # as remove() does: the tagger waits for the lock ...
        tagger = threading.Thread(target=tag)
        tagger.start()
        time.sleep(0.3)
        os.unlink(tmp_path / "store" / "images" / "sha256" / (image.image_id[7:] + ".json"))
    tagger.join(10)
    assert st.refs() == {}  # ... and then finds the record gone
    assert len(errors) == 1


def test_times_are_rfc3339_and_source_date_epoch_is_honoured() -> None:
    """Issue 9, item 12: what an OCI config may say as "created" (Go's time.RFC3339), and the time
    a record is made: $SOURCE_DATE_EPOCH when set (reproducible builds), else now."""
    from pytest_sandbox.core.imagemodel import is_rfc3339, now_rfc3339

    for good in ("2024-05-01T00:00:00Z", "2024-05-01T00:00:00.123456789+02:00", now_rfc3339({})):
        assert is_rfc3339(good), good
    for bad in ("", "2024-05-01", "2024-13-01T00:00:00Z", "2024-05-01 00:00:00Z", "yesterday"):
        assert not is_rfc3339(bad), bad
    assert now_rfc3339({"SOURCE_DATE_EPOCH": "0"}) == "1970-01-01T00:00:00Z"
    assert now_rfc3339({"SOURCE_DATE_EPOCH": "1700000000"}) == "2023-11-14T22:13:20Z"
    for bad in ("-1", "1.5", "", "1e9", "١٢"):
        with pytest.raises(InvalidSpecError, match="SOURCE_DATE_EPOCH"):
            now_rfc3339({"SOURCE_DATE_EPOCH": bad})
