//! Medians, percentiles and paired ratios with a confidence interval.

pub fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Linear interpolation between closest ranks; NaN when empty.
pub fn percentile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let at = (v.len() - 1) as f64 * q;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (at - lo as f64)
}

/// A ratio of paired measurements (`a[i] / b[i]`, each pair from one
/// round): the geometric mean of the ratios and its 95% confidence
/// interval (Student's t on the logarithms); no interval under 2 pairs.
#[derive(Clone, Copy, Debug)]
pub struct Ratio {
    pub value: f64,
    pub low: f64,
    pub high: f64,
    pub pairs: usize,
}

impl Ratio {
    pub fn paired(a: &[f64], b: &[f64]) -> Self {
        let logs: Vec<f64> = a
            .iter()
            .zip(b)
            .map(|(a, b)| (a / b).ln())
            .filter(|x| x.is_finite())
            .collect();
        let n = logs.len();
        if n == 0 {
            return Self {
                value: f64::NAN,
                low: f64::NAN,
                high: f64::NAN,
                pairs: 0,
            };
        }
        let mean = logs.iter().sum::<f64>() / n as f64;
        let half = if n < 2 {
            f64::NAN
        } else {
            let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            t95(n - 1) * (var / n as f64).sqrt()
        };
        Self {
            value: mean.exp(),
            low: (mean - half).exp(),
            high: (mean + half).exp(),
            pairs: n,
        }
    }

    /// `0.973 [0.95, 0.99] n=12`, or without the interval.
    pub fn show(&self) -> String {
        if self.low.is_finite() {
            format!(
                "{:.3} [{:.3}, {:.3}] n={}",
                self.value, self.low, self.high, self.pairs
            )
        } else {
            format!("{:.3} n={}", self.value, self.pairs)
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "ratio": self.value, "ci95_low": self.low, "ci95_high": self.high, "pairs": self.pairs,
        })
    }
}

/// Two-sided 95% quantile of Student's t with `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    T.get(df.wrapping_sub(1)).copied().unwrap_or(1.96)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_of_equal_pairs_is_one_with_a_tight_interval() {
        let r = Ratio::paired(&[2.0, 4.0, 8.0], &[2.0, 4.0, 8.0]);
        assert!((r.value - 1.0).abs() < 1e-12);
        assert!((r.high - r.low).abs() < 1e-12);
    }

    #[test]
    fn percentiles_interpolate() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(percentile(&[1.0, 2.0], 1.0), 2.0);
    }
}
