"""Cases: every case of a submission, the slice viewer with its errors, its lesions, and the cases no one gets right."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from bench.app import queries, ui, viewer
from bench.metrics import METRICS
from bench.report import metric_header


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

ctx = ui.context()
scope = ui.scope_sidebar(ctx)
dataset_version, protocol, convention = scope
runs = ui.run_choice()

st.title("Cases")
st.caption("Where does a model fail, on which site and lesion pattern, and what does the failure look like?")

top_left, top_right = st.columns([3, 2], vertical_alignment="top")
with top_right:
    sort_metric = ui.metric_picker("Sort by", key="cases_metric", help="Worst cases first (failed cases on top).")
metrics = tuple(dict.fromkeys([sort_metric, *(m for m in queries.CASE_TABLE_METRICS if m in METRICS)]))
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
        **{m: st.column_config.NumberColumn(metric_header(m), format="%.3f" if METRICS[m].unit in ("", "ml") else "%.1f", help=METRICS[m].name) for m in metrics},
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
            st.info("The prediction file of this case is not available: showing the reference lesions only (as false negatives).")

lesions = ui.case_lesions(ctx.url, ctx.version, str(row["run_id"]), case_id)

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
    controls[0].slider("Slice", 1, n_slices, key=slice_key, help="Axial slice, counted from 1 (array axis 0).")
    controls[1].button("◀ lesion", on_click=_jump, args=(reference_centres, -1), disabled=not reference_centres, key="prev_lesion", width="stretch")
    controls[2].button("lesion ▶", on_click=_jump, args=(reference_centres, +1), disabled=not reference_centres, key="next_lesion", width="stretch")
    controls[3].button("◀ error", on_click=_jump, args=(view.error_slices, -1), disabled=not view.error_slices, key="prev_error", width="stretch")
    controls[4].button("error ▶", on_click=_jump, args=(view.error_slices, +1), disabled=not view.error_slices, key="next_error", width="stretch")

    overlay_column, zoom_column = st.columns([3, 2], vertical_alignment="bottom")
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
        "Zoom to the lesions and errors", value=True, key="viewer_zoom", persist_state="session", help="HIE lesions are small: frame them (the same frame on every slice)."
    )
    z = int(st.session_state[slice_key]) - 1
    spacing = view.volumes.spacing
    rows, cols = viewer.focus_box(view.errors) if zoom else (slice(None), slice(None))
    images = st.columns(len(view.volumes.channels))
    for column, (name, volume) in zip(images, view.volumes.channels.items()):
        rgb = viewer.render_slice(
            volume[z, rows, cols],
            view.errors[z, rows, cols],
            window=view.windows[name],
            foreground=view.foreground[z, rows, cols],
            pixel_mm=(spacing[1], spacing[2]),
            show=shown or (),
            height=IMAGE_PX,
        )
        column.image(viewer.to_png(rgb), caption=f"{name} · slice {z + 1} of {n_slices}", width=IMAGE_PX)
    st.html(ui.legend_html(list(viewer.OVERLAY_CLASSES)))
    counts = {key: int((view.errors[z] == code).sum()) for key, (code, _, _) in viewer.OVERLAY_CLASSES.items()}
    st.caption(
        f"This slice: {counts['tp']} true-positive, {counts['fp']} false-positive, {counts['fn']} false-negative voxels · "
        f"voxel {spacing[1]:.2f} × {spacing[2]:.2f} mm, slice thickness {spacing[0]:.2f} mm · "
        f"slices with errors: {', '.join(str(s + 1) for s in view.error_slices) or 'none'}"
    )

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
        },
    )
    if (picked := _new_selection(lesion_event, f"lesions::{case_id}")) is not None and view is not None:
        target = lesions["slice"].iloc[picked]
        if pd.notna(target) and int(target) + 1 != st.session_state.get(f"slice::{case_id}"):
            _request(f"slice::{case_id}", int(target) + 1)

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
