"""Cases: every case of a submission, the slice viewer with its errors, probability, uncertainty and saliency,
its lesions, the submission's calibration, and the cases no one gets right."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from bench.app import queries, ui, viewer
from bench.metrics import METRICS
from bench.report import NOT_AVAILABLE, metric_header, metric_info, reliability_figure
from bench.results import PROBABILITY_METRICS


def _apply_pending(key: str, allowed: list | None = None) -> None:
    """Apply a value chosen further down the page in the previous run (a widget cannot be changed
    once drawn, so tables below the viewer leave the new value here and rerun)."""
    pending = st.session_state.pop(f"_pending::{key}", None)
    if pending is not None and (allowed is None or pending in allowed):
        st.session_state[key] = pending


def _request(key: str, value: object) -> None:
    st.session_state[f"_pending::{key}"] = value
    st.rerun()


def _new_selection(event: object, name: str) -> int | None:
    """The row index just selected in a table (``None`` when the selection did not change)."""
    rows = tuple(event.selection.rows)  # type: ignore[attr-defined]
    last_key = f"_last_rows::{name}"
    changed = rows != st.session_state.get(last_key, ())
    st.session_state[last_key] = rows
    return rows[0] if rows and changed else None


#: Width of each slice image on screen (pixels).
IMAGE_PX = 440
#: Height of the zoomed inset, as a share of the slice image.
INSET_SHARE = 0.5


@st.cache_resource(max_entries=8, show_spinner="Reading the probability map…")
def _heat_maps(probability_path: str, display: tuple) -> dict[str, np.ndarray]:
    """The stored probability of a case and its entropy in display orientation, read once (shared read-only by sessions)."""
    from bench.data.figures import DisplayTransform

    return viewer.display_heat_maps(probability_path, DisplayTransform(*display))


@st.cache_resource(max_entries=16, show_spinner="Computing integrated gradients (a few seconds on a CPU)…")
def _saliency(run_folder: str, root: str, case_id: str, prediction_path: str, lesion_id: int) -> tuple[np.ndarray, dict]:
    """Saliency of one predicted lesion, computed on the native grid and returned in display orientation."""
    return viewer.display_saliency(run_folder, root, case_id, ui.case_view(root, case_id, prediction_path).volumes, lesion_id)


@st.cache_data(max_entries=64, show_spinner=False)
def _centroids(url: str, version: str, run_id: str, case_id: str) -> pd.DataFrame:
    """Stored lesion centroids of one case (native voxel indices), to place them in the display orientation."""
    lesions = ui.get_store(url).lesion_frame(run_ids=[run_id], latest_only=False)
    lesions = lesions[lesions["case_id"].astype(str) == case_id]
    return lesions[["kind", "lesion_id", "centroid_z", "centroid_y", "centroid_x"]].reset_index(drop=True)


@st.cache_data(max_entries=16, show_spinner=False)
def _reliability(url: str, version: str, scope: tuple, runs: str, submission: str) -> pd.DataFrame:
    frame = ui.case_frame(url, version, scope, ("dice",), runs, details=False)
    return queries.reliability(ui.get_store(url), frame[frame["submission"].astype(str) == submission])


def _probability_text(value: float) -> str:
    return NOT_AVAILABLE if value is None or not math.isfinite(float(value)) else f"{float(value):.3f}"

ctx = ui.context()
scope = ui.scope_sidebar(ctx)
dataset_version, protocol, convention = scope
runs = ui.run_choice()

st.title("Cases")
st.caption("Where does a model fail, on which site and lesion pattern, and what does the failure look like?")

top_left, top_right = st.columns([3, 2], vertical_alignment="top")
with top_right:
    sort_metric = ui.metric_picker("Sort by", key="cases_metric", help="Worst cases first (failed cases on top).")
metrics = tuple(dict.fromkeys([sort_metric, *(m for m in queries.CASE_TABLE_METRICS if m in METRICS), *PROBABILITY_METRICS]))
frame = ui.case_frame(ctx.url, ctx.version, scope, metrics, runs)
rank_metric = ui.ranking_metric()
# Best first, as the leaderboard ranks them: the page opens on the submission most worth studying.
submissions = ui.ranked_submissions(ctx.url, ctx.version, scope, rank_metric, runs)
with top_left:
    ui.url_choice("submission", submissions)
    submission = st.selectbox("Submission", submissions, key="submission", help=f"Listed by rank on the leaderboard's metric ({rank_metric}), best first.")
    ui.write_to_url("submission", submission)

cases_meta = ui.dataset_cases(ctx.url, ctx.version, dataset_version)
table = queries.case_table(frame, submission, cases_meta, metrics)
higher = METRICS[sort_metric].higher_is_better
table = table.sort_values([sort_metric, "case_id"], ascending=[bool(higher), True], na_position="first", ignore_index=True)

_apply_pending("case", table["case_id"].tolist())
shown_columns = ["case_id", "site", "pattern", "ref_lesions", "status", *[m for m in metrics if m in table.columns]]
event = st.dataframe(
    table[shown_columns],
    hide_index=True,
    width="stretch",
    height=min(420, 38 + 35 * len(table)),
    key="cases_table",
    on_select="rerun",
    selection_mode="single-row",
    column_config={
        "case_id": st.column_config.TextColumn("Case"),
        "ref_lesions": st.column_config.NumberColumn("Lesions", help="Reference lesions in the case (dataset metadata)."),
        "status": st.column_config.TextColumn("Status", help="'failed': no usable prediction; scored as the worst value."),
        **{m: st.column_config.NumberColumn(metric_header(m), format="%.3f" if metric_info(m).unit in ("", "ml") else "%.1f", help=metric_info(m).name) for m in metrics},
    },
)
if (picked := _new_selection(event, "cases")) is not None and picked < len(table):
    st.session_state["case"] = table["case_id"].iloc[picked]

st.caption(f"{len(table)} cases of **{submission}**, worst {sort_metric} first. Click a row (or pick the case below) to open it in the viewer; click a header to sort.")

# -- the viewer --------------------------------------------------------------------------------------------------------
st.subheader("Slice viewer")
case_ids = table["case_id"].tolist()
ui.keep_valid("case", case_ids)
# Plain ids as labels: a bound widget writes its label into the address (?case=SiteA_001).
case_id = st.selectbox("Case", case_ids, key="case", bind="query-params")
row = table.set_index("case_id").loc[case_id]

facts = st.columns(5)
facts[0].metric("Site", str(row["site"]))
facts[1].metric("Pattern", str(row.get("pattern") or "–"))
for column, key in zip(facts[2:], [m for m in ("dice", "hd95", "lesion_f1") if m in row.index]):
    column.metric(metric_header(key), ui.fmt(row[key]))
calibration = st.columns(5)
for column, key in zip(calibration, PROBABILITY_METRICS):
    column.metric(metric_header(key), _probability_text(row.get(key)), help=PROBABILITY_METRICS[key].info.description)
if row["status"] != "ok":
    st.error(f"This case failed: {row['error'] or 'no reason stored'}", icon=":material/error:")

root = ui.dataset_root(ctx, dataset_version)
view = None
if root is None:
    st.warning(f"The dataset folder of version `{dataset_version}` is not on this machine, so images cannot be shown.")
else:
    prediction_path = row["prediction_path"] if isinstance(row["prediction_path"], str) and row["prediction_path"] else None
    try:
        view = ui.case_view(str(root), case_id, prediction_path)
    except viewer.ViewerError as exc:
        st.warning(f"Cannot show this case: {exc}")
    else:
        if view.volumes.prediction is None:
            where = (f"`{prediction_path}` is not on this machine (moved, deleted, or the results folder is mounted elsewhere)"
                     if prediction_path else "the run stored no prediction path (the case failed)")
            st.info(f"The prediction file of this case is not available: {where}. Showing the reference lesions only (as false negatives).")

lesions = ui.case_lesions(ctx.url, ctx.version, str(row["run_id"]), case_id)
if view is not None and view.volumes.display is not None and not view.volumes.display.is_identity:
    # Stored centroids are native voxel indices: the slice is shown in the display orientation's numbering.
    needs_xy = view.volumes.display.axes[0] != 0
    lesions = viewer.display_lesion_slices(lesions, _centroids(ctx.url, ctx.version, str(row["run_id"]), case_id) if needs_xy else None,
                                           view.volumes.display)

if view is not None:
    n_slices = view.volumes.n_slices
    # The slider counts slices from 1, as radiologists do; arrays count from 0.
    slice_key = f"slice::{case_id}"
    if slice_key not in st.session_state:
        st.session_state[slice_key] = view.first_slice + 1
    _apply_pending(slice_key)
    reference_centres = sorted({int(z) for z in lesions.loc[lesions["kind"] == "reference", "slice"].dropna()}) or list(view.lesion_slices)

    def _jump(targets: list[int] | tuple[int, ...], direction: int) -> None:
        target = viewer.step_to(st.session_state[slice_key] - 1, targets, direction)
        if target is not None:
            st.session_state[slice_key] = min(max(target, 0), n_slices - 1) + 1

    controls = st.columns([5, 1, 1, 1, 1], vertical_alignment="bottom")
    controls[0].slider("Slice", 1, n_slices, key=slice_key, help="Axial slice in radiological orientation (LPS: slice 1 is the most inferior), counted from 1.")
    controls[1].button("◀ lesion", on_click=_jump, args=(reference_centres, -1), disabled=not reference_centres, key="prev_lesion", width="stretch")
    controls[2].button("lesion ▶", on_click=_jump, args=(reference_centres, +1), disabled=not reference_centres, key="next_lesion", width="stretch")
    controls[3].button("◀ error", on_click=_jump, args=(view.error_slices, -1), disabled=not view.error_slices, key="prev_error", width="stretch")
    controls[4].button("error ▶", on_click=_jump, args=(view.error_slices, +1), disabled=not view.error_slices, key="next_error", width="stretch")

    overlay_column, zoom_column, opacity_column = st.columns([3, 2, 2], vertical_alignment="bottom")
    shown = overlay_column.pills(
        "Overlay",
        list(viewer.OVERLAY_CLASSES),
        default=list(viewer.OVERLAY_CLASSES),
        selection_mode="multi",
        format_func={"tp": "true positive", "fp": "false positive", "fn": "false negative"}.__getitem__,
        key="overlay_classes",
        persist_state="session",
    )
    zoom = zoom_column.toggle(
        "Zoomed inset", value=True, key="viewer_zoom", persist_state="session",
        help="HIE lesions are small: a magnified inset of the lesions and errors (the yellow frame) on the full slice.",
    )
    opacity = opacity_column.slider("Overlay opacity", 0.1, 1.0, 0.6, 0.05, key="overlay_opacity", help="Opacity of every overlay.")
    z = int(st.session_state[slice_key]) - 1
    spacing = view.volumes.spacing
    box = viewer.focus_box(view.errors)
    probability_path = row.get("probability_path") if isinstance(row.get("probability_path"), str) else None
    heat = _heat_maps(probability_path, tuple(view.volumes.display)) if probability_path and view.volumes.display is not None else {}

    # Saliency on demand: a trained MONAI fold can explain one of its predicted lesions.
    run_folder = viewer.saliency_run_folder(prediction_path, str(row["fold"]))
    predicted_ids = lesions.loc[lesions["kind"] == "predicted", "lesion_id"].astype(int).tolist()
    saliency_key = f"saliency::{row['run_id']}::{case_id}"
    if run_folder is None:
        st.caption("Saliency not available for this submission (it has no trained MONAI model in its run folder).")
    elif not predicted_ids or view.volumes.prediction is None:
        st.caption("Saliency: this case has no predicted lesion to explain.")
    else:
        pick, go = st.columns([2, 1], vertical_alignment="bottom")
        lesion_id = pick.selectbox("Explain predicted lesion", predicted_ids, key=f"{saliency_key}::lesion")
        if go.button("Compute saliency", key="saliency_button", help="Integrated gradients of the fold's model for this lesion; cached."):
            try:
                st.session_state[saliency_key] = (lesion_id, *_saliency(str(run_folder), str(root), case_id, prediction_path, int(lesion_id)))
            except Exception as exc:  # a model folder that cannot be loaded must not take the page down
                st.warning(f"Saliency could not be computed: {type(exc).__name__}: {exc}")
    if saliency_key in st.session_state:
        heat = {**heat, "saliency": st.session_state[saliency_key][1]}

    def draw(volume, name: str, overlay: str | None = None) -> np.ndarray:
        """One slice, full, with the errors (``overlay=None``) or a continuous map, and the zoomed inset."""
        values = heat.get(overlay) if overlay else None
        common = dict(window=view.windows[name], pixel_mm=(spacing[1], spacing[2]), alpha=opacity, heat_overlay=overlay or "probability",
                      heat_range=viewer.heat_range_of(values, overlay) if overlay else None, show=() if overlay else (shown or ()))
        full = viewer.render_slice(volume[z], None if overlay else view.errors[z], foreground=view.foreground[z], height=IMAGE_PX,
                                   heat=None if values is None else values[z], **common)
        if not zoom:
            return full
        crop = (z, *box)
        inset = viewer.render_slice(volume[crop], None if overlay else view.errors[crop], foreground=view.foreground[crop],
                                    height=int(IMAGE_PX * INSET_SHARE), heat=None if values is None else values[crop], **common)
        return viewer.with_inset(full, inset, box, volume.shape[1:])

    images = st.columns(len(view.volumes.channels))
    for column, (name, volume) in zip(images, view.volumes.channels.items()):
        column.image(viewer.to_png(draw(volume, name)), caption=f"{name} · slice {z + 1} of {n_slices}", width=IMAGE_PX)
    st.html(ui.legend_html(list(viewer.OVERLAY_CLASSES)))
    counts = {key: int((view.errors[z] == code).sum()) for key, (code, _, _) in viewer.OVERLAY_CLASSES.items()}
    st.caption(
        f"This slice: {counts['tp']} true-positive, {counts['fp']} false-positive, {counts['fn']} false-negative voxels · "
        f"voxel {spacing[1]:.2f} × {spacing[2]:.2f} mm, slice thickness {spacing[0]:.2f} mm · "
        f"slices with errors: {', '.join(str(s + 1) for s in view.error_slices) or 'none'}"
    )
    if heat:
        first = next(iter(view.volumes.channels))
        maps = st.columns(len(heat))
        for column, key in zip(maps, heat):
            column.image(viewer.to_png(draw(view.volumes.channels[first], first, key)), caption=f"{key} on {first} · slice {z + 1}",
                         width=IMAGE_PX if len(heat) < 3 else "stretch")
            column.html(viewer.colourbar_html(key, viewer.heat_range_of(heat[key], key)))
        if "saliency" in heat:
            facts = st.session_state[saliency_key][2]
            totals = ", ".join(f"{k} {v:+.3g}" for k, v in facts["channel_totals"].items())
            st.caption(f"Saliency of predicted lesion {st.session_state[saliency_key][0]}: integrated gradients, {facts['n_steps']} steps, "
                       f"completeness error {facts['completeness_error']:.1%}; attribution per channel: {totals}.")
    else:
        st.caption("Probability and uncertainty: not available (this submission stores no lesion probability map).")

# -- lesions of the case -------------------------------------------------------------------------------------------------
st.subheader("Lesions")
if lesions.empty:
    st.caption("No lesion rows stored for this case (no reference lesion and no predicted component, or a failed case).")
else:
    n_ref = int((lesions["kind"] == "reference").sum())
    n_missed = int((lesions["outcome"] == "missed").sum())
    n_fp = int((lesions["outcome"] == "false positive").sum())
    st.caption(f"{n_ref} reference lesion(s), {n_missed} missed; {n_fp} false-positive component(s). Select a row to jump to its slice.")

    lesion_event = st.dataframe(
        lesions.drop(columns="detected").assign(slice=lesions["slice"] + 1),
        hide_index=True,
        width="stretch",
        key="lesion_table",
        on_select="rerun",
        selection_mode="single-row",
        column_config={
            "kind": "Kind",
            "lesion_id": st.column_config.NumberColumn("Id"),
            "outcome": "Outcome",
            "volume_ml": st.column_config.NumberColumn("Volume [ml]", format="%.3f"),
            "voxels": st.column_config.NumberColumn("Voxels"),
            "slice": st.column_config.NumberColumn("Slice", help="Centroid slice (1-based, as in the viewer)."),
            "uncertainty": st.column_config.NumberColumn("Uncertainty [bits]", format="%.3f",
                                                         help="Predicted components: mean entropy of the probability map (empty without one)."),
        },
    )
    if (picked := _new_selection(lesion_event, f"lesions::{case_id}")) is not None and view is not None:
        target = lesions["slice"].iloc[picked]
        if pd.notna(target) and int(target) + 1 != st.session_state.get(f"slice::{case_id}"):
            _request(f"slice::{case_id}", int(target) + 1)

# -- calibration of the submission -------------------------------------------------------------------------------------
st.subheader("Calibration")
reliability = _reliability(ctx.url, ctx.version, scope, runs, submission)
if reliability.empty:
    st.caption(f"Reliability diagram: {NOT_AVAILABLE} ({submission} stores no lesion probability map).")
else:
    figure = ui.plotly_layout(reliability_figure(reliability, group="site"), height=440)
    st.plotly_chart(figure.update_layout(title=None), key="reliability_plot")
    st.caption(f"Reliability of **{submission}**, all cases and per site: calibration histograms of the cases summed (every brain voxel "
               "counts once), 15 equal-width bins of the lesion probability; the dotted diagonal is perfect calibration, a line below it "
               "is over-confident.")

# -- hard cases --------------------------------------------------------------------------------------------------------------
st.subheader("Cases every submission fails")
hard_left, hard_right = st.columns([2, 3])
with hard_left:
    hard_metric = ui.metric_picker("Failure metric", key="hard_metric", default="dice")
    info = METRICS[hard_metric]
    low, high = info.range
    if info.higher_is_better:
        threshold = st.slider("Fails when below", float(low), float(high) if high < float("inf") else 1.0, 0.1, 0.05, key="hard_threshold")
    else:
        threshold = st.number_input(f"Fails when above [{info.unit}]", min_value=0.0, value=20.0, step=1.0, key="hard_threshold_value")
hard_frame = ui.case_frame(ctx.url, ctx.version, scope, (hard_metric,), runs)
hard = queries.failed_by_all(hard_frame, hard_metric, threshold)
with hard_right:
    if hard.empty:
        st.success(f"Every case is solved by at least one of the {len(submissions)} submissions at this threshold.", icon=":material/check_circle:")
    else:
        hard_event = st.dataframe(
            hard.drop(columns="n_submissions"),
            hide_index=True,
            width="stretch",
            key="hard_table",
            on_select="rerun",
            selection_mode="single-row",
            column_config={"best": st.column_config.NumberColumn(f"best {hard_metric}", format="%.3f"), "best_submission": "best submission"},
        )
        if (picked := _new_selection(hard_event, "hard")) is not None and hard["case_id"].iloc[picked] != case_id:
            _request("case", str(hard["case_id"].iloc[picked]))
        st.caption(f"{len(hard)} case(s) where all {len(submissions)} submissions fail (or have no prediction). Select one to open it above.")
