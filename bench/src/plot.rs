//! PNG plots of requests completed per 100 ms after restore, one line per
//! method, like the paper's figures.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

/// Font file for labels (Debian's fonts-dejavu-core, installed by scripts/setup.sh).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes =
            std::fs::read(FONT).map_err(|e| format!("font {FONT}: {e} (run scripts/setup.sh)"))?;
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("font {FONT}: not a usable TrueType font"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One line: a method's requests per window over time.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Requests completed in consecutive windows.
    pub per_window: Vec<u64>,
}

/// Draw `series` (windows of `window_ms`) into `out`, titled `title`.
pub fn throughput(out: &Path, title: &str, window_ms: u64, series: &[Series]) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_x = series.iter().map(|s| s.per_window.len()).max().unwrap_or(1) as f64
        * window_ms as f64
        / 1000.0;
    let max_y = series
        .iter()
        .flat_map(|s| s.per_window.iter().copied())
        .max()
        .unwrap_or(1) as f64
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x.max(0.1), 0.0..max_y.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("seconds since restore started")
        .y_desc(format!("requests per {window_ms} ms"))
        .draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        let points = s
            .per_window
            .iter()
            .enumerate()
            .map(|(k, &n)| ((k as f64 + 0.5) * window_ms as f64 / 1000.0, n as f64));
        chart
            .draw_series(LineSeries::new(points, color))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing plot {}", out.display()))?;
    Ok(())
}

/// Draw `series` of (x, y) points as lines with markers into `out`.
pub fn lines(
    out: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(out, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let pts = || series.iter().flat_map(|s| s.1.iter().copied());
    let max_x = pts().map(|p| p.0).fold(1.0, f64::max);
    let max_y = pts().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()?;
    for (i, (label, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color))?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color));
        chart.draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, 4, Palette99::pick(i).filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing plot {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_with_one_line_per_method() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("t.png");
        let series = vec![
            Series {
                label: "warm".into(),
                per_window: vec![100; 20],
            },
            Series {
                label: "lazy".into(),
                per_window: (0..20).map(|i| i * 5).collect(),
            },
        ];
        throughput(&out, "test", 100, &series).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5000, "{}", bytes.len());
    }
}
