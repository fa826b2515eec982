//! Plots with plotters, pure Rust: `.svg` through the SVG backend, `.png` through the bitmap backend.
//! Text is laid out with ab_glyph from a TrueType font read at run time (`SWITCHBOARD_BENCH_FONT`, else
//! DejaVu Sans or Liberation Sans from the usual system paths), so nothing needs fontconfig or freetype.
//!
//! Two kinds: latency against percentile (the HdrHistogram view: the x axis is log10(1/(1-p)), so 90%,
//! 99%, 99.9% ... are evenly spaced), and a plain x/y line chart for time series and sweeps.

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::stats::HistogramJson;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// Registers a font for "sans-serif" once per process.
fn ensure_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        let candidates: Vec<String> = std::env::var("SWITCHBOARD_BENCH_FONT")
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|s| s.to_string()))
            .collect();
        for path in &candidates {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no TrueType font found for plot labels (tried {}); set SWITCHBOARD_BENCH_FONT=/path/to/font.ttf \
             or install fonts-dejavu-core",
            candidates.join(", ")
        ))
    })
    .clone()
}

/// One latency curve: a label and its histogram.
pub struct Curve<'a> {
    pub label: String,
    pub hist: &'a HistogramJson,
}

/// One x/y line.
pub struct Line {
    pub label: String,
    pub points: Vec<[f64; 2]>,
}

fn percentile_x(p: f64) -> f64 {
    let tail = (1.0 - p / 100.0).max(1e-7);
    -tail.log10()
}

fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if x < 0.5 {
        "0%".into()
    } else {
        let s = format!("{p:.5}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}%")
    }
}

/// Latency-by-percentile plot of one or more histograms, written to `path` (.svg or .png).
pub fn percentile_plot(path: &Path, title: &str, curves: &[Curve]) -> Result<(), String> {
    // The axis ends where the largest sample count stops resolving percentiles (6000 samples: 99.99%);
    // the 100% point of each curve is drawn at the right edge.
    let samples = curves
        .iter()
        .map(|c| c.hist.summary.count)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_x = samples.log10().ceil().clamp(2.0, 7.0);
    let max_y = curves
        .iter()
        .map(|c| c.hist.summary.max_ms)
        .fold(1.0f64, f64::max)
        * 1.05;
    let lines = curves
        .iter()
        .map(|c| Line {
            label: c.label.clone(),
            points: c
                .hist
                .percentiles
                .iter()
                .map(|p| [percentile_x(p[0]).min(max_x), p[1]])
                .collect(),
        })
        .collect();
    render(
        path,
        Chart {
            title: title.to_string(),
            x_desc: "percentile".into(),
            y_desc: "latency (ms)".into(),
            x_range: (0.0, max_x),
            y_max: max_y,
            percentile_axis: true,
            lines,
        },
    )
}

/// A line chart of `lines` (e.g. RSS against time, p99 against offered rate).
pub fn line_plot(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: Vec<Line>,
) -> Result<(), String> {
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let (min_x, max_x) = all().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p[0]), b.max(p[0])));
    let max_y = all().fold(0f64, |m, p| m.max(p[1]));
    let x_range = if min_x > max_x {
        (0.0, 1.0)
    } else {
        (min_x, max_x.max(min_x + 1e-9))
    };
    let y_max = if max_y <= 0.0 { 1.0 } else { max_y * 1.1 };
    render(
        path,
        Chart {
            title: title.to_string(),
            x_desc: x_desc.to_string(),
            y_desc: y_desc.to_string(),
            x_range,
            y_max,
            percentile_axis: false,
            lines,
        },
    )
}

/// Everything one chart needs, independent of the backend.
struct Chart {
    title: String,
    x_desc: String,
    y_desc: String,
    x_range: (f64, f64),
    y_max: f64,
    percentile_axis: bool,
    lines: Vec<Line>,
}

const SIZE: (u32, u32) = (1000, 600);

/// Picks the backend from the file extension.
fn render(path: &Path, chart: Chart) -> Result<(), String> {
    ensure_font()?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "svg" => {
            let root = SVGBackend::new(path, SIZE).into_drawing_area();
            chart.draw(root)
        }
        "png" => {
            let root = BitMapBackend::new(path, SIZE).into_drawing_area();
            chart.draw(root)
        }
        _ => Err(format!(
            "plot file {} must end in .svg or .png",
            path.display()
        )),
    }
}

impl Chart {
    fn draw<DB: DrawingBackend>(self, root: DrawingArea<DB, Shift>) -> Result<(), String>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, ("sans-serif", 22))
            .margin(15)
            .margin_right(50)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(self.x_range.0..self.x_range.1, 0f64..self.y_max)
            .map_err(|e| e.to_string())?;
        {
            let mut mesh = chart.configure_mesh();
            mesh.x_desc(self.x_desc.as_str())
                .y_desc(self.y_desc.as_str());
            let fmt = |x: &f64| percentile_label(*x);
            if self.percentile_axis {
                mesh.x_labels(self.x_range.1 as usize + 1)
                    .x_label_formatter(&fmt);
            }
            mesh.draw().map_err(|e| e.to_string())?;
        }
        for (i, line) in self.lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = line.points.iter().map(|p| (p[0], p[1])).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(line.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if pts.len() <= 40 {
                chart
                    .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_axis_labels() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert!((percentile_x(99.0) - 2.0).abs() < 1e-9);
    }
}
