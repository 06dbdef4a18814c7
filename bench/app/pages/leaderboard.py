"""Leaderboard: mean with bootstrap CI per submission, rank and rank stability, overall or per site."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from bench.report import PROBABILITY_NOTE, pairs_caption, pairs_display, reliability_figure

from bench.app import queries, ui
from bench.metrics import METRICS
from bench.report import DEFAULT_METRICS, metric_header

ctx = ui.context()
scope = ui.scope_sidebar(ctx)
dataset_version, protocol, convention = scope
runs = ui.run_choice()

st.title("Leaderboard")
scope_row = ui.scopes(ctx.url, ctx.version)
dataset_name = scope_row.loc[scope_row["dataset_version"] == dataset_version, "dataset"].iloc[0]
st.caption(
    f"**{dataset_name}** (version `{dataset_version}`) · {queries.PROTOCOL_LABELS.get(protocol, protocol)} · "
    f"convention `{convention}` · {runs} run of each submission"
)

left, middle, right = st.columns([3, 4, 2], vertical_alignment="top")
with left:
    metric = ui.metric_picker("Ranking metric", key=ui.LEADERBOARD_METRIC_KEY, help="The leaderboard ranks by the mean of this metric.")
with middle:
    extra_options = [m for m in METRICS if m != metric]
    extra = st.multiselect(
        "Also show",
        extra_options,
        default=[m for m in DEFAULT_METRICS if m in extra_options],  # as `bench leaderboard`
        format_func=metric_header,
        key="board_extra",
    )
with right:
    view = st.segmented_control("View", ["Overall", "Per site"], default="Overall", key="board_view", required=True)

frame_metrics = tuple(dict.fromkeys([metric, *extra]))
site: str | None = None
if view == "Per site":
    sites = sorted(ui.case_frame(ctx.url, ctx.version, scope, frame_metrics, runs, details=False)["site"].astype(str).unique())
    site = st.selectbox("Site", sites, key="board_site", help="Statistics over the cases of this site only (bootstrap within it).")

board = ui.leaderboard(ctx.url, ctx.version, scope, frame_metrics, runs, site)
if board.empty:
    st.warning("No case results for this selection.")
    st.stop()

higher = METRICS[metric].higher_is_better
table = pd.DataFrame(
    {
        "Rank": board["rank"].astype("Int64"),
        "Submission": board["submission"].astype(str),
        "Card": [ui.card_link(h) for h in board["submission_hash"]],
        "Cases": board["n_cases"].astype(int),
        "Failed": board["n_failed"].astype(int),
        metric_header(metric): board[metric],
        "95% CI": [queries.format_ci(lo, hi, reference=m) for m, lo, hi in zip(board[metric], board[f"{metric}_lo"], board[f"{metric}_hi"])],
        "Rank stability": board["rank_stability"],
        "Mean rank": board["mean_rank"],
        "Training budget used": board["budget"].astype(str),
        "Resolution": board["resolution"].astype(str),
    }
)
for other in extra:
    table[metric_header(other)] = [queries.format_interval(m, lo, hi) for m, lo, hi in zip(board[other], board[f"{other}_lo"], board[f"{other}_hi"])]
capped = int(board[f"{metric}_capped"].sum()) if f"{metric}_capped" in board else 0

st.dataframe(
    table,
    hide_index=True,
    width="stretch",
    key="board_table",
    column_config={
        "Rank": st.column_config.NumberColumn(width="small", help="Aggregate-then-rank on the mean of the ranking metric."),
        "Card": st.column_config.LinkColumn("Card", display_text="open card", width="small", help="The submission's manifest, README and runs."),
        metric_header(metric): st.column_config.NumberColumn(format="%.3f", help=f"Mean over cases; {queries.metric_direction(metric)}."),
        "95% CI": st.column_config.TextColumn(help="Percentile bootstrap interval, cases resampled within site."),
        "Rank stability": st.column_config.ProgressColumn(
            min_value=0.0, max_value=1.0, format="percent", help="Share of bootstrap resamples in which the submission keeps this rank."
        ),
        "Mean rank": st.column_config.NumberColumn(format="%.2f", help="Rank-then-aggregate: rank within each case, averaged."),
        "Failed": st.column_config.NumberColumn(help="Failed or missing cases; they count as the metric's worst value."),
        "Training budget used": st.column_config.TextColumn(help="The training budget the run used, in patch-voxels ('–': it does not train)."),
        "Resolution": st.column_config.TextColumn(help="The voxel grid the model saw: median = resampled to the target spacing nnU-Net plans; native = the scans' own."),
    },
)
notes = [
    f"Mean over {'the cases of site ' + site if site else 'all cases'} with a 95% bootstrap CI (cases resampled within site, {ui.N_BOOT} resamples).",
    "Failed or missing cases count as the metric's worst value.",
]
if capped:
    notes.append(f"{capped} infinite value(s) (one mask empty) are scored as the cap {METRICS[metric].inf_cap:g} {METRICS[metric].unit}.")
st.caption(" ".join(notes))

st.download_button(
    "Download leaderboard (CSV)",
    board.assign(dataset=dataset_name, dataset_version=dataset_version, protocol=protocol, convention=convention, site=site or "overall").to_csv(index=False),
    file_name=f"hie-bench-leaderboard-{dataset_name}-{protocol}-{site or 'overall'}-{metric}.csv",
    mime="text/csv",
    icon=":material/download:",
    key="board_download",
)

# -- forest plot of the means ---------------------------------------------------------------------------------------
colours = ui.colour_map(board["submission"].astype(str).tolist())
ordered = board.iloc[::-1]
fig = go.Figure(
    go.Scatter(
        x=ordered[metric],
        y=ordered["submission"].astype(str),
        mode="markers",
        marker=dict(size=11, color=[colours[s] for s in ordered["submission"].astype(str)]),
        error_x=dict(type="data", symmetric=False, array=ordered[f"{metric}_hi"] - ordered[metric], arrayminus=ordered[metric] - ordered[f"{metric}_lo"], thickness=2),
        hovertemplate="%{y}<br>mean %{x:.3f}<extra></extra>",
    )
)
ui.plotly_layout(fig, height=max(160, 46 * len(board) + 80), showlegend=False)
fig.update_xaxes(title=f"{metric_header(metric)} — mean with 95% CI" + (" (right is better)" if higher else " (left is better)"))
st.plotly_chart(fig, key="board_forest")

# -- paired tests: each rank against the next, pre-trained twins against their scratch submissions ---------------
pairs = ui.paired_tests(ctx.url, ctx.version, scope, frame_metrics, runs, site)
if not pairs.empty:
    st.subheader("Paired tests")
    st.dataframe(pairs_display(pairs), hide_index=True, width="stretch", key="board_pairs")
    st.caption(pairs_caption(pairs))

# -- calibration and uncertainty ------------------------------------------------------------------------------------
st.subheader("Calibration and uncertainty")
st.dataframe(queries.probability_display(ui.probability_board(ctx.url, ctx.version, scope, runs, site)), hide_index=True, width="stretch",
             key="board_probabilities")
st.caption(PROBABILITY_NOTE.strip())
diagram = ui.reliability(ctx.url, ctx.version, scope, runs)
diagram = diagram[diagram["site"] == (site or "overall")] if not diagram.empty else diagram
if not diagram.empty:
    st.plotly_chart(ui.plotly_layout(reliability_figure(diagram, colours=colours)).update_layout(title=None), key="board_reliability")

# -- per-site matrix ------------------------------------------------------------------------------------------------
if view == "Per site":
    st.subheader("Every site at a glance")
    summary = ui.site_summary(ctx.url, ctx.version, scope, metric, runs)
    summary = summary[summary["site"] != "overall"]
    means = summary.pivot(index="submission", columns="site", values="mean").reindex(board["submission"].astype(str))
    texts = summary.assign(text=[queries.format_interval(m, lo, hi) for m, lo, hi in zip(summary["mean"], summary["mean_lo"], summary["mean_hi"])])
    texts = texts.pivot(index="submission", columns="site", values="text").reindex(index=means.index, columns=means.columns)
    heat = go.Figure(
        go.Heatmap(
            z=means.to_numpy(),
            x=list(means.columns),
            y=list(means.index),
            text=texts.to_numpy(),
            texttemplate="%{text}",
            colorscale="Viridis" if higher else "Viridis_r",
            colorbar=dict(title=metric),
            hovertemplate="%{y}<br>%{x}: %{text}<extra></extra>",
        )
    )
    ui.plotly_layout(heat, height=max(200, 50 * len(means) + 90))
    heat.update_yaxes(autorange="reversed")
    st.plotly_chart(heat, key="board_sites")
    st.caption("Mean [95% CI] of each submission on each site (bootstrap within the site).")

# -- rank distribution ------------------------------------------------------------------------------------------------
if st.toggle("Show the bootstrap rank distribution", key="board_blobs", help="challengeR's blob plot: how often each submission takes each rank."):
    dist = ui.rank_distribution(ctx.url, ctx.version, scope, metric, runs, site)
    dist = dist[dist["fraction"] > 0]
    blob = go.Figure(
        go.Scatter(
            x=dist["submission"],
            y=dist["rank"],
            mode="markers",
            marker=dict(size=np.sqrt(dist["fraction"]) * 40, color=[colours.get(s, "#888") for s in dist["submission"]], opacity=0.8),
            hovertemplate="%{x}: rank %{y} in %{customdata:.0%} of resamples<extra></extra>",
            customdata=dist["fraction"],
        )
    )
    ui.plotly_layout(blob, height=360, showlegend=False)
    blob.update_xaxes(categoryorder="array", categoryarray=board["submission"].astype(str).tolist(), title="")
    blob.update_yaxes(autorange="reversed", dtick=1, title="rank")
    st.plotly_chart(blob, key="board_blob_plot")
