//! The figures, drawn like the paper's Figures 4 and 5.

use plotters::prelude::*;

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};

use super::report::Curve;

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    let bytes = fs::read(FONT)
        .with_context(|| format!("cannot read {FONT}: run ./setup.sh (fonts-dejavu-core)"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let _ = DONE.set(());
    Ok(())
}

pub(super) fn figures(curves: &[Curve], out: &Path) -> anyhow::Result<()> {
    if curves.is_empty() {
        bail!("no NetPIPE results to plot");
    }
    register_font()?;
    figure(
        curves,
        &out.join("bandwidth.png"),
        "Bandwidth (NetPIPE)",
        "bandwidth (Mbit/s)",
        false,
        |c| (c.bare_mbps, c.pvc_mbps),
    )?;
    figure(
        curves,
        &out.join("latency.png"),
        "Latency (NetPIPE, one way)",
        "latency (µs)",
        true,
        |c| (c.bare_usec, c.pvc_usec),
    )
}

fn figure(
    curves: &[Curve],
    path: &PathBuf,
    title: &str,
    y_desc: &str,
    log_y: bool,
    value: fn(&Curve) -> (f64, f64),
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let x_max = curves.last().map_or(2.0, |c| c.bytes as f64 * 1.5);
    let (lo, hi) = curves.iter().fold((f64::INFINITY, 0f64), |(lo, hi), c| {
        let (b, p) = value(c);
        (lo.min(b).min(p), hi.max(b).max(p))
    });
    let mut chart = ChartBuilder::on(&root);
    chart
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80);
    let series = |c: &Curve, pvc: bool| {
        let (b, p) = value(c);
        (c.bytes as f64, if pvc { p } else { b })
    };
    macro_rules! draw_chart {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("message size (bytes)")
                .y_desc(y_desc)
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(draw)?;
            for (pvc, color, name) in [(false, BLUE, "bare network"), (true, RED, "PVC")] {
                let points: Vec<(f64, f64)> = curves.iter().map(|c| series(c, pvc)).collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(draw)?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .into_iter()
                            .map(|p| Circle::new(p, 3, color.filled())),
                    )
                    .map_err(draw)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font(("sans-serif", 16))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(draw)?;
        }};
    }
    if log_y {
        draw_chart!(
            chart
                .build_cartesian_2d((1f64..x_max).log_scale(), (lo * 0.8..hi * 1.25).log_scale())
                .map_err(draw)?
        );
    } else {
        draw_chart!(
            chart
                .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..hi * 1.1)
                .map_err(draw)?
        );
    }
    root.present().map_err(draw)?;
    Ok(())
}

fn draw(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw the figure: {e}")
}
