"""Pictures (issue 14): the block matrix equals the Hessian structure (data array and pixels),
the dataflow layout has no overlapping nodes and the right coupling groups, each picture of
ResNet-56, MobileNetV2 and ViT-B/16 takes under 10 s, and the HTML report is self-contained
with images that decode to their stated sizes."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import networkx as nx
import numpy as np
import pytest
import torch

import oba_fx
from oba_fx.models import get_model
from oba_fx.passes.pipeline import analyze_model
from oba_fx.pictures.blocks import COLORS, KINDS, block_matrix, block_matrix_figure, block_rows
from oba_fx.pictures.dataflow import dataflow_graph, simplify
from oba_fx.pictures.flowdraw import MAX_WIDTH, _column_width, _geometry, _texts
from oba_fx.pictures.layout import layered_layout
from oba_fx.report import flops_by_module, layer_sizes, write_pictures

torch.set_num_threads(1)
MODELS = {"resnet56": 32, "mobilenet_v2": 224, "vit_b_16": 224}


@pytest.fixture(scope="module")
def analysed():
    cache = {}

    def get(name):
        if name not in cache:
            size = MODELS.get(name, 32)
            cache[name] = analyze_model(get_model(name).eval(), (torch.randn(1, 3, size, size),),
                                        hessian_structure=True)
        return cache[name]
    return get


def expected_matrix(H: nx.Graph, order: list[str]) -> np.ndarray:
    """Built here from the edge list alone: self-loop -> self, else the edge's kind."""
    n = len(order)
    M = np.zeros((n, n), dtype=int)
    for i, a in enumerate(order):
        for j, b in enumerate(order):
            if H.has_edge(a, b):
                M[i, j] = KINDS.index("self") if a == b else KINDS.index(H.edges[a, b]["kind"])
    return M


def execution_order(gm) -> list[str]:
    """Layers in order of first use in the FX graph (module call or parameter read)."""
    H = gm.meta["oba.hessian_structure"]
    seen = []
    for node in gm.graph.nodes:
        for cand in (str(node.target), str(node.target).rpartition(".")[0]):
            if node.op in ("call_module", "get_attr") and cand in H and cand not in seen:
                seen.append(cand)
                break
    return seen


@pytest.mark.parametrize("name", list(MODELS))
def test_block_matrix_image_data_equals_hessian_structure(analysed, name):
    gm = analysed(name)
    H = gm.meta["oba.hessian_structure"]
    bm = block_matrix(H)
    order = execution_order(gm)
    assert list(bm.labels) == order
    want = expected_matrix(H, order)
    fig = block_matrix_figure(bm)
    image = fig.axes[0].images[0].get_array()
    assert np.array_equal(np.asarray(image), want)
    # the pixels: the colour at every cell centre is its kind's colour
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    ax = fig.axes[0]
    ii, jj = np.meshgrid(np.arange(len(order)), np.arange(len(order)), indexing="ij")
    px = ax.transData.transform(np.c_[jj.ravel(), ii.ravel()])
    cols = np.round(px[:, 0]).astype(int)
    rows = rgba.shape[0] - np.round(px[:, 1]).astype(int)
    palette = np.array([[int(c[k:k + 2], 16) for k in (1, 3, 5)] for c in COLORS])
    seen = rgba[rows, cols]
    kind = np.argmin(((seen[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    assert np.array_equal(kind.reshape(want.shape), want)
    import matplotlib.pyplot as plt
    plt.close(fig)
    rows_ = block_rows(bm)
    assert len(rows_) == H.number_of_edges()


def test_block_matrix_aggregates_past_200_layers(analysed):
    gm = analysed("resnet110")
    H = gm.meta["oba.hessian_structure"]
    order = execution_order(gm)
    assert len(order) > 200
    bm = block_matrix(H)
    assert bm.aggregated_depth is not None and len(bm.labels) <= 200
    full = expected_matrix(H, order)
    strength = {0: 0, 1: 1, 3: 2, 2: 3}  # zero < self < parallel < series
    group = [next(k for k, lab in enumerate(bm.labels) if n == lab or n.startswith(lab + ".")) for n in order]
    for a in range(len(bm.labels)):
        for b in range(len(bm.labels)):
            cells = full[np.ix_([i for i, g in enumerate(group) if g == a], [j for j, g in enumerate(group) if g == b])]
            assert bm.codes[a, b] == max(cells.ravel(), key=strength.get)


def test_block_matrix_on_a_toy_with_every_kind():
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.c(torch.tanh(self.a(x)) * self.b(x))
    H = oba_fx.hessian_structure(Gate(), torch.randn(2, 4))
    bm = block_matrix(H)
    assert bm.kind("a", "a") == "self" and bm.kind("a", "b") == "parallel" and bm.kind("a", "c") == "series"
    assert bm.kind("b", "b") == "zero"


def _boxes(S):
    texts = _texts(S)
    L = layered_layout(S, max_columns=max(6, min(20, int(MAX_WIDTH / _column_width(texts)))))
    g = _geometry(L, texts)
    out = {}
    for n in S.nodes:
        x, y = g.xy(L.column[n], L.slot[n])
        out[n] = (x - g.box_w / 2, y - g.box_h / 2, x + g.box_w / 2, y + g.box_h / 2)
    return out, g


@pytest.mark.parametrize("name", list(MODELS))
def test_dataflow_layout_has_no_overlap_and_true_groups(analysed, name):
    gm = analysed(name)
    c = gm.meta["oba.coupling"]
    G = dataflow_graph(gm)
    for n, d in G.nodes(data=True):  # a conv / linear node's group is its weight's output-channel group
        key = (f"{d['path']}.weight", 0)
        if d["kind"] == "layer" and d["op"] in ("Conv2d", "Linear") and key in c.param_spaces and not d["fixed"]:
            assert d["group"] == int(c.group[c.units_of(c.param_spaces[key])[0]])
    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"} & set(gm.meta["oba.hessian_structure"])
    assert modules <= {d["path"] for _, d in G.nodes(data=True)}
    S = simplify(G)
    assert nx.is_directed_acyclic_graph(S) and S.number_of_nodes() <= 60
    boxes, g = _boxes(S)
    items = list(boxes.values())
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            a, b = items[i], items[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "overlapping nodes"
    assert g.layout.per_row * g.col_w <= MAX_WIDTH + 1e-9 or g.layout.per_row == 6


@pytest.mark.parametrize("name", list(MODELS))
def test_each_picture_under_10_seconds_and_legible(analysed, name, tmp_path):
    gm = analysed(name)
    report = {"layers": layer_sizes(gm, gm), "flops_by_module": flops_by_module(gm, gm), "heads": {},
              "flops_before": 1, "flops_after": 1}
    images = write_pictures(gm, report, tmp_path, name,
                            history={"epochs": [1, 2], "train_loss": [1.0, 0.5], "eval_accuracy": [0.5, 0.6]})
    assert set(report["picture_seconds"]) == {"hessian_blocks", "dataflow", "removed", "finetune"}
    assert max(report["picture_seconds"].values()) < 10.0, report["picture_seconds"]
    from PIL import Image
    for path, _ in images.values():
        with Image.open(path) as im:
            assert im.size[0] <= 3200 and im.size[1] <= 4000, (path, im.size)
    back = nx.read_graphml(tmp_path / "dataflow.graphml")
    assert back.number_of_nodes() == dataflow_graph(gm).number_of_nodes()
    assert (tmp_path / "dataflow.dot").read_text().startswith("digraph")
    csv_rows = (tmp_path / "hessian_blocks.csv").read_text().splitlines()
    assert csv_rows[0] == "row,column,kind" and len(csv_rows) == 1 + gm.meta["oba.hessian_structure"].number_of_edges()


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs))


def check_html(path, n_images):
    from PIL import Image

    page = path.read_text(encoding="utf-8")
    assert path.stat().st_size < 5e6
    p = _Images()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags
    assert not re.search(r"(src|href)=[\"']?(https?:|//)", page) and "@import" not in page
    assert len(p.images) == n_images
    from PIL import Image
    for img in p.images:
        head, data = img["src"].split(",", 1)
        assert head == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
            assert im.size == (int(img["width"]), int(img["height"]))
    return page


def test_html_report_of_prune_graph(tmp_path):
    torch.manual_seed(0)
    m = get_model("resnet20").eval()
    out = oba_fx.prune_graph(m, torch.randn(1, 3, 32, 32), target_flops=0.6, verbose=False, report_dir=tmp_path / "r")
    page = check_html(tmp_path / "r" / "report.html", 3)
    assert "layer1.0.conv1" in page and "Hessian block matrix" in page
    # written again with accuracy and a fine-tuning history, from the pruned graph alone
    path = oba_fx.report.write(out, tmp_path / "again", accuracy={"before": {"test": 0.9}, "after": {"test": 0.5}},
                               history={"epochs": [1, 2], "train_loss": [0.9, 0.4], "eval_accuracy": [0.6, 0.7]})
    page = check_html(path, 4)
    assert "90.00 %" in page and "70.00 %" in page


def test_write_refuses_a_graph_without_report(tmp_path):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no report"):
        oba_fx.report.write(gm, tmp_path)


@pytest.mark.slow
def test_cli_writes_the_report_next_to_the_saved_model(data_dir, tmp_path):
    from oba_fx.cli import main

    out = tmp_path / "r56.pt"
    rc = main(["prune", "--data", str(data_dir), "--test-limit", "100", "--calib-batches", "1", "--quiet",
               "--out", str(out)])
    assert rc == 0
    page = check_html(tmp_path / "r56.pt.report" / "report.html", 3)
    assert "before" in page and "resnet56" in page
