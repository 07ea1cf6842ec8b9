//! PNG line charts of a run (plotters, bitmap backend). The labels use a
//! small font compiled into the binary (DejaVu Sans cut down to ASCII, see
//! `assets/FONT-LICENSE`), so plotting needs no system font library.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::register_font;

use crate::error::PlotError;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// Line colour (RGB).
    pub color: (u8, u8, u8),
    /// Dashed-looking thin line (baselines) instead of a thick one.
    pub thin: bool,
}

/// Line colours for charts of several lines (matplotlib's first eight).
pub const PALETTE: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
];

fn font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok =
        *REGISTERED.get_or_init(|| register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    if ok { Ok(()) } else { Err(PlotError::Font) }
}

/// Draws `series` into a PNG at `path`: x from the data, y over `y_range`
/// (or the data's range when `None`).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
) -> Result<(), PlotError> {
    font()?;
    let err = |source| PlotError::Draw {
        path: path.to_path_buf(),
        source,
    };
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut x0, mut x1) = finite().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = match y_range {
        Some(r) => r,
        None => {
            let (lo, hi) = finite().fold((f64::MAX, f64::MIN), |(a, b), (_, y)| {
                (a.min(*y), b.max(*y))
            });
            if lo > hi {
                (0.0, 1.0)
            } else {
                let pad = ((hi - lo) * 0.05).max(1e-9);
                (lo - pad, hi + pad)
            }
        }
    };
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(RGBColor(240, 240, 240))
        .x_label_formatter(&|x| {
            if x1 - x0 < 20.0 {
                format!("{x:.1}")
            } else {
                format!("{x:.0}")
            }
        })
        .draw()
        .map_err(err)?;
    for s in series {
        let (r, g, b) = s.color;
        let style = RGBColor(r, g, b).stroke_width(if s.thin { 1 } else { 3 });
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| (x, y.clamp(y0, y1)))
            .collect();
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(err)?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(legend_place(series, y0, y1))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Where the legend goes: lower right, unless the lines end mostly in the
/// lower half (falling curves, like bits per byte), then upper right.
fn legend_place(series: &[Series], y0: f64, y1: f64) -> SeriesLabelPosition {
    let ends: Vec<f64> = series
        .iter()
        .filter(|s| !s.thin)
        .filter_map(|s| {
            s.points
                .iter()
                .rev()
                .find(|(x, y)| x.is_finite() && y.is_finite())
        })
        .map(|(_, y)| (y - y0) / (y1 - y0))
        .collect();
    let low = ends.iter().filter(|f| **f < 0.5).count();
    if low * 2 > ends.len() {
        SeriesLabelPosition::UpperRight
    } else {
        SeriesLabelPosition::LowerRight
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_chart_is_a_png_with_ink_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let series = vec![
            Series {
                label: "rising".into(),
                points: (0..20)
                    .map(|i| (f64::from(i), f64::from(i) / 20.0))
                    .collect(),
                color: (31, 119, 180),
                thin: false,
            },
            Series {
                label: "flat, with a gap".into(),
                points: vec![(0.0, 0.5), (5.0, f64::NAN), (19.0, 0.5)],
                color: (214, 39, 40),
                thin: true,
            },
        ];
        line_chart(
            &path,
            "test",
            "round",
            "accuracy",
            &series,
            Some((0.0, 1.0)),
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 5_000, "{} bytes", bytes.len());
        // Empty input still draws axes rather than failing.
        line_chart(&path, "empty", "x", "y", &[], None).unwrap();
    }
}
