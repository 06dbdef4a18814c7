"""Datasets: cases per site, grids and spacings, lesion volumes and patterns, an example montage."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from bench.app import ui

ctx = ui.context(require_results=False)
table = ui.datasets(ctx.url, ctx.version)
with st.sidebar:
    ui.database_caption(ctx)

st.title("Datasets")
if table.empty:
    ui.empty_state(ctx.source)
    st.stop()

# The result pages' stable order and address (?dataset=NAME or VERSION); opens on the scope's dataset.
ordered = table.sort_values(["name", "version"])
labels = {row.version: f"{row.name} · {row.version}" for row in ordered.itertuples()}
if "datasets_dataset" not in st.session_state and st.session_state.get("scope_dataset") in labels:
    st.session_state["datasets_dataset"] = st.session_state["scope_dataset"]
ui.url_choice("dataset", list(labels), key="datasets_dataset", aliases=ordered.drop_duplicates("name").set_index("name")["version"].to_dict())
version = st.selectbox("Dataset", list(labels), format_func=labels.__getitem__, key="datasets_dataset", persist_state="session")
ui.write_to_url("dataset", version)
info = table[table["version"] == version].iloc[0]
cases = ui.dataset_cases(ctx.url, ctx.version, version)
root = ui.dataset_root(ctx, version)
st.caption(f"Folder `{info['root'] or '?'}` · channels {', '.join(info['channel_names'] or [])} · registered {info['registered_at']:%Y-%m-%d %H:%M} UTC")

facts = st.columns(4)
facts[0].metric("Cases", len(cases))
facts[1].metric("Sites", cases["site"].nunique())
facts[2].metric("Lesion patterns", cases["pattern"].nunique() if cases["pattern"].notna().any() else "–")
volumes = cases["lesion_volume_ml"].dropna()
facts[3].metric("Median lesion volume", f"{volumes.median():.2f} ml" if len(volumes) else "–")

# -- per site -------------------------------------------------------------------------------------------------------------
st.subheader("Sites")
per_site = cases.groupby("site").agg(
    cases=("case_id", "size"),
    scanner=("scanner", lambda s: ", ".join(sorted(set(s.dropna().astype(str)))) or "–"),
    with_lesions=("n_lesions", lambda s: int((s.fillna(0) > 0).sum())),
    lesions=("n_lesions", "sum"),
    median_volume_ml=("lesion_volume_ml", "median"),
)
if root is not None:
    grid = ui.dataset_geometry(str(root))
    spacing = grid.groupby("site").agg(
        in_plane_mm=("spacing_y", "median"), slice_mm=("spacing_z", "median"), matrix=("shape_y", "median"), slices=("shape_z", "median"),
        slice_range=("spacing_z", lambda s: f"{s.min():.1f}–{s.max():.1f}"),
    )
    per_site = per_site.join(spacing)
else:
    grid = None
    st.caption("The dataset folder is not on this machine: grids and the montage are not shown.")
st.dataframe(
    per_site.reset_index(),
    hide_index=True,
    width="stretch",
    key="datasets_sites",
    column_config={
        "with_lesions": st.column_config.NumberColumn("cases with lesions"),
        "median_volume_ml": st.column_config.NumberColumn("median lesion volume [ml]", format="%.2f"),
        "in_plane_mm": st.column_config.NumberColumn("in-plane spacing [mm]", format="%.2f"),
        "slice_mm": st.column_config.NumberColumn("slice spacing [mm]", format="%.2f"),
        "slice_range": "slice spacing range [mm]",
        "matrix": st.column_config.NumberColumn("matrix", format="%d"),
        "slices": st.column_config.NumberColumn("slices", format="%d"),
    },
)

# -- distributions ----------------------------------------------------------------------------------------------------------
left, right = st.columns(2)
with left:
    st.markdown("**Lesion volume per case**")
    histogram = go.Figure()
    largest = float(volumes.max()) if len(volumes) else 1.0
    bins = dict(start=0.0, end=largest * 1.0001, size=max(largest / 20, 1e-3))  # the same bins for every site
    for site, part in cases.groupby("site"):
        histogram.add_trace(go.Histogram(x=part["lesion_volume_ml"], name=str(site), opacity=0.65, xbins=bins, bingroup="volume"))
    ui.plotly_layout(histogram, height=340, barmode="overlay")
    histogram.update_xaxes(title="reference lesion volume [ml]")
    histogram.update_yaxes(title="cases")
    st.plotly_chart(histogram, key="datasets_volumes")
with right:
    if grid is not None:
        st.markdown("**Voxel spacing per case**")
        spacing_plot = go.Figure()
        for site, part in grid.groupby("site"):
            spacing_plot.add_trace(go.Scatter(x=part["spacing_y"], y=part["spacing_z"], mode="markers", name=str(site), text=part["case_id"], marker=dict(size=9, opacity=0.8)))
        ui.plotly_layout(spacing_plot, height=340)
        spacing_plot.update_xaxes(title="in-plane spacing [mm]")
        spacing_plot.update_yaxes(title="slice spacing [mm]")
        st.plotly_chart(spacing_plot, key="datasets_spacing")
if cases["pattern"].notna().any():
    st.markdown("**Lesion pattern by site**")
    counts = cases.groupby(["site", "pattern"]).size().unstack(fill_value=0)
    patterns = go.Figure([go.Bar(x=counts.index.astype(str), y=counts[p], name=str(p)) for p in counts.columns])
    ui.plotly_layout(patterns, height=300, barmode="stack")
    patterns.update_yaxes(title="cases")
    st.plotly_chart(patterns, key="datasets_patterns")

# -- montage -----------------------------------------------------------------------------------------------------------------
if root is not None:
    st.subheader("Examples")
    channels = list(info["channel_names"] or ["ADC"])
    channel = st.segmented_control("Channel", channels, default=channels[0], key="datasets_channel", required=True)
    per_site_examples = st.slider("Cases per site", 1, 6, 3, key="datasets_examples")
    examples = cases.sort_values(["site", "lesion_volume_ml"], ascending=[True, False]).groupby("site").head(per_site_examples)
    tiles = [ui.case_tile(str(root), case_id, channel) for case_id in examples["case_id"]]
    columns = st.columns(per_site_examples)
    for index, (tile, (_, row)) in enumerate(zip(tiles, examples.iterrows())):
        columns[index % per_site_examples].image(tile, caption=f"{row['site']} · {row['case_id']} · {row['pattern'] or ''}", width="stretch")
    st.caption(f"The slice with the most reference lesion of each case, lesions in yellow; {channel} window from the case's brain voxels.")
