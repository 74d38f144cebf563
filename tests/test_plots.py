"""Plots are drawn from the report's numbers and are real, non-empty PNGs."""
import io

from PIL import Image

from pipeline.report.plots import render_plots


def _report():
    return {
        "components": ["stem", "transformer", "head"],
        "methods": {
            name: {"val": v, "id_test": v - 0.01, "ood": {"noise": v - 0.2}, "ood_avg": v - 0.2,
                   "ingredients": ["ft-000", "ft-001"], "beta": [[0.5, 0.7, 1.0], [0.5, 0.3, 0.0]]}
            for name, v in [("zero_shot", 0.6), ("best_individual", 0.9), ("uniform_soup", 0.88),
                            ("greedy_soup", 0.91), ("mmms_phase1", 0.92), ("mmms", 0.93)]
        },
        "ingredient_scores": {"ft-000": {"val": 0.9, "id_test": 0.89, "ood_avg": 0.7},
                              "ft-001": {"val": 0.85, "id_test": 0.86, "ood_avg": 0.72}},
        "search_trace": [[1, 0.9], [5, 0.91], [9, 0.93]],
    }


def test_plots_are_non_empty_pngs():
    pngs = render_plots(_report())
    assert set(pngs) == {"id_vs_ood.png", "beta_mmms.png", "search_trace.png"}
    for name, data in pngs.items():
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.width > 200 and img.height > 100, name
        # not a blank canvas: many distinct colours
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20)) > 20, name


def test_plots_follow_the_numbers():
    a = render_plots(_report())
    r = _report()
    r["methods"]["mmms"]["beta"] = [[1.0, 0.0, 0.2], [0.0, 1.0, 0.8]]
    b = render_plots(r)
    assert a["beta_mmms.png"] != b["beta_mmms.png"]
    assert a["id_vs_ood.png"] == b["id_vs_ood.png"]


def test_plots_describe_the_published_method_and_every_search_trace():
    r = _report()
    r["published"] = "greedy_soup"
    r["traces"] = {"greedy_soup": [[1, 0.9], [2, 0.91]], "mmms": [[1, 0.9], [9, 0.93]]}
    pngs = render_plots(r)
    assert set(pngs) == {"id_vs_ood.png", "beta_greedy_soup.png", "search_trace.png"}
    only_mmms = render_plots({**r, "traces": {"mmms": r["traces"]["mmms"]}})
    assert only_mmms["search_trace.png"] != pngs["search_trace.png"]
    # a published model that is not a mixture: mmms's mixture is drawn; no method searched: no trace
    r["published"] = "model_stock"
    r["methods"]["model_stock"] = {**r["methods"]["mmms"], "ingredients": [], "beta": []}
    r["traces"], r["search_trace"] = {}, []
    assert set(render_plots(r)) == {"id_vs_ood.png", "beta_mmms.png"}
