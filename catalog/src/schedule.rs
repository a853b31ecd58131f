//! Backup schedules: standard five-field cron expressions (minute, hour, day of month,
//! month, day of week), always in UTC.
//!
//! A [`Schedule`] that exists fires at least once: expressions that can never match
//! (`0 0 30 2 *`) are refused when parsed, as is anything beyond standard cron (seconds,
//! years, `L`/`W`/`#`, `@reboot`). Every refusal names the field at fault, because the
//! message reaches an operator's catalog error or an API client's 400 as it is. This
//! module only computes times; it must never sleep, spawn or read the clock.
//!
//! Day matching follows Vixie cron, which users' crontabs are written against: when both
//! day fields are restricted a day matches either; when one starts with `*` both must
//! match.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, TimeDelta, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A parsed cron expression; displays and serialises as the text it was parsed from.
#[derive(Clone, PartialEq, Eq)]
pub struct Schedule {
    source: String,
    minutes: u64,
    hours: u64,
    days_of_month: u64,
    months: u64,
    days_of_week: u64,
    /// Either day field starts with `*`: a day must then match both fields.
    day_fields_and: bool,
}

/// One field of an expression: its name in messages, its bounds and its value names.
struct Field {
    name: &'static str,
    min: u8,
    max: u8,
    /// Names of the values from `min` on (`JAN` is 1, `SUN` is 0).
    names: &'static [&'static str],
    /// `min` and `max` name the same value (Sunday), so a range may end at `min`.
    min_is_max: bool,
}

const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    min_is_max: false,
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    min_is_max: false,
};
const DAY_OF_MONTH: Field = Field {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
    min_is_max: false,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ],
    min_is_max: false,
};
/// 0 and 7 are both Sunday, as in every cron.
const DAY_OF_WEEK: Field = Field {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
    min_is_max: true,
};

/// Days in each month of a leap year: a day that exists in no such month never comes.
const LONGEST_MONTHS: [u8; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

/// The longest expression accepted, as the plans' parameter schemas say.
const MAX_LEN: usize = 100;

/// Every date pattern repeats within one Gregorian cycle of 400 years.
const SEARCH_DAYS: u32 = 146_097 + 366;

impl Schedule {
    /// Parses a five-field cron expression or one of `@yearly`, `@annually`,
    /// `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`.
    ///
    /// # Errors
    /// A user-facing message naming the field at fault, when the expression is not
    /// standard cron or can never fire.
    pub fn parse(expression: &str) -> Result<Self, String> {
        if expression.len() > MAX_LEN {
            return Err(format!("a schedule is at most {MAX_LEN} characters long"));
        }
        let text = expression.trim();
        let expanded = if let Some(nickname) = text.strip_prefix('@') {
            nickname_fields(nickname).ok_or_else(|| {
                format!(
                    "{text:?} is not a schedule nickname: use @yearly, @monthly, @weekly, \
                     @daily or @hourly"
                )
            })?
        } else {
            text
        };
        let fields: Vec<&str> = expanded.split_ascii_whitespace().collect();
        let [minute, hour, day_of_month, month, day_of_week] = fields[..] else {
            return Err(format!(
                "a schedule has 5 fields (minute hour day-of-month month day-of-week), \
                 {text:?} has {}",
                fields.len()
            ));
        };
        let mut days_of_week = parse_field(&DAY_OF_WEEK, day_of_week)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week & !(1 << 7)) | 1;
        }
        let schedule = Self {
            source: expression.to_owned(),
            minutes: parse_field(&MINUTE, minute)?,
            hours: parse_field(&HOUR, hour)?,
            days_of_month: parse_field(&DAY_OF_MONTH, day_of_month)?,
            months: parse_field(&MONTH, month)?,
            days_of_week,
            day_fields_and: day_of_month.starts_with('*') || day_of_week.starts_with('*'),
        };
        // Restricted on both day fields, any month has matching weekdays; otherwise the
        // day of month must exist in one of the months.
        let some_day_exists = !schedule.day_fields_and
            || (1u8..).zip(LONGEST_MONTHS).any(|(month, days)| {
                schedule.months & (1 << month) != 0
                    && (1..=days).any(|day| schedule.days_of_month & (1 << day) != 0)
            });
        if !some_day_exists {
            return Err(format!(
                "day-of-month: {day_of_month:?} never falls in month {month:?}, so the \
                 schedule would never fire"
            ));
        }
        Ok(schedule)
    }

    /// The first time strictly after `after` (at a whole minute) when the schedule
    /// fires; `None` only past the end of the calendar that dates can represent.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let start = after
            .with_second(0)?
            .with_nanosecond(0)?
            .checked_add_signed(TimeDelta::minutes(1))?;
        let mut date = start.date_naive();
        let mut earliest = (start.hour(), start.minute());
        for _ in 0..SEARCH_DAYS {
            if self.months & (1 << date.month()) == 0 {
                date = first_of_next_month(date)?;
                earliest = (0, 0);
                continue;
            }
            if self.day_matches(date)
                && let Some((hour, minute)) = self.first_time_from(earliest)
            {
                return date.and_hms_opt(hour, minute, 0).map(|t| t.and_utc());
            }
            date = date.succ_opt()?;
            earliest = (0, 0);
        }
        None
    }

    /// The expression as it was given.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    fn day_matches(&self, date: NaiveDate) -> bool {
        let by_month = self.days_of_month & (1 << date.day()) != 0;
        let by_week = self.days_of_week & (1 << date.weekday().num_days_from_sunday()) != 0;
        if self.day_fields_and {
            by_month && by_week
        } else {
            by_month || by_week
        }
    }

    /// The first (hour, minute) of a matching day not before `(hour, minute)`.
    fn first_time_from(&self, (hour, minute): (u32, u32)) -> Option<(u32, u32)> {
        (hour..24)
            .filter(|h| self.hours & (1 << h) != 0)
            .find_map(|h| {
                let from = if h == hour { minute } else { 0 };
                (from..60)
                    .find(|m| self.minutes & (1 << m) != 0)
                    .map(|m| (h, m))
            })
    }
}

fn nickname_fields(nickname: &str) -> Option<&'static str> {
    Some(match nickname.to_ascii_lowercase().as_str() {
        "yearly" | "annually" => "0 0 1 1 *",
        "monthly" => "0 0 1 * *",
        "weekly" => "0 0 * * 0",
        "daily" | "midnight" => "0 0 * * *",
        "hourly" => "0 * * * *",
        _ => return None,
    })
}

fn first_of_next_month(date: NaiveDate) -> Option<NaiveDate> {
    if date.month() == 12 {
        NaiveDate::from_ymd_opt(date.year().checked_add(1)?, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(date.year(), date.month() + 1, 1)
    }
}

/// A comma-separated list of `*`, values and ranges, each with an optional `/step`, as a
/// bit set of the values it selects.
fn parse_field(field: &Field, text: &str) -> Result<u64, String> {
    let name = field.name;
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(parse_step(field, step)?)),
            None => (item, None),
        };
        let (low, high) = if range == "*" {
            (field.min, field.max)
        } else if let Some((low, high)) = range.split_once('-') {
            let (low, mut high) = (parse_value(field, low)?, parse_value(field, high)?);
            if field.min_is_max && high == field.min && low > high {
                // FRI-SUN
                high = field.max;
            }
            if low > high {
                return Err(format!("{name}: the range {range:?} runs backwards"));
            }
            (low, high)
        } else {
            let value = parse_value(field, range)?;
            // `5/15` is Vixie's `5-59/15`.
            (value, if step.is_some() { field.max } else { value })
        };
        for value in (low..=high).step_by(usize::from(step.unwrap_or(1))) {
            bits |= 1 << value;
        }
    }
    Ok(bits)
}

fn parse_step(field: &Field, text: &str) -> Result<u8, String> {
    let span = field.max - field.min;
    match text.parse::<u8>() {
        Ok(step) if (1..=span).contains(&step) => Ok(step),
        _ => Err(format!(
            "{}: the step {text:?} is not a number from 1 to {span}",
            field.name
        )),
    }
}

fn parse_value(field: &Field, text: &str) -> Result<u8, String> {
    let (name, min, max) = (field.name, field.min, field.max);
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<u8>() {
            Ok(value) if (min..=max).contains(&value) => Ok(value),
            _ => Err(format!("{name}: {text:?} is out of range {min}-{max}")),
        };
    }
    if let Some(index) = field
        .names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(text))
    {
        // Names are at most 12, so the index fits.
        return Ok(min + u8::try_from(index).unwrap_or(u8::MAX));
    }
    let expected = match field.names {
        [] => format!("a number {min}-{max}"),
        [first, .., last] => format!("a number {min}-{max} or a name {first}-{last}"),
        [only] => format!("a number {min}-{max} or {only}"),
    };
    Err(format!("{name}: {text:?} is not {expected}"))
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.source)
    }
}

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    /// The next `count` fire times after `from`, as RFC 3339 text.
    fn fires(expression: &str, from: &str, count: usize) -> Vec<String> {
        let schedule = Schedule::parse(expression).unwrap();
        let mut time = at(from);
        (0..count)
            .map(|_| {
                time = schedule.next_after(time).unwrap();
                time.to_rfc3339()
            })
            .collect()
    }

    fn refusal(expression: &str) -> String {
        Schedule::parse(expression).unwrap_err()
    }

    #[test]
    fn a_daily_schedule_fires_strictly_after_the_given_time() {
        assert_eq!(
            fires("0 3 * * *", "2024-05-01T02:59:59.999Z", 2),
            ["2024-05-01T03:00:00+00:00", "2024-05-02T03:00:00+00:00"]
        );
        assert_eq!(
            fires("0 3 * * *", "2024-05-01T03:00:00Z", 1),
            ["2024-05-02T03:00:00+00:00"]
        );
    }

    #[test]
    fn fire_times_roll_over_month_and_year_ends() {
        assert_eq!(
            fires("30 23 * * *", "2023-12-31T23:30:00Z", 1),
            ["2024-01-01T23:30:00+00:00"]
        );
        assert_eq!(
            fires("0 0 1 * *", "2024-01-15T00:00:00Z", 2),
            ["2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"]
        );
        assert_eq!(
            fires("0 12 31 * *", "2024-01-31T12:00:00Z", 2),
            ["2024-03-31T12:00:00+00:00", "2024-05-31T12:00:00+00:00"]
        );
        assert_eq!(
            fires("0 0 29 2 *", "2024-03-01T00:00:00Z", 1),
            ["2028-02-29T00:00:00+00:00"]
        );
        // 2100 is no leap year.
        assert_eq!(
            fires("0 0 29 FEB *", "2096-03-01T00:00:00Z", 1),
            ["2104-02-29T00:00:00+00:00"]
        );
    }

    #[test]
    fn days_of_week_match_by_number_and_name() {
        // 2024-05-01 is a Wednesday.
        let mondays = ["2024-05-06T09:00:00+00:00", "2024-05-13T09:00:00+00:00"];
        assert_eq!(fires("0 9 * * 1", "2024-05-01T00:00:00Z", 2), mondays);
        assert_eq!(fires("0 9 * * mon", "2024-05-01T00:00:00Z", 2), mondays);
        assert_eq!(
            fires("0 9 * * 0", "2024-05-01T00:00:00Z", 1),
            fires("0 9 * * 7", "2024-05-01T00:00:00Z", 1)
        );
        assert_eq!(
            fires("0 9 * * FRI-SUN", "2024-05-01T00:00:00Z", 4),
            [
                "2024-05-03T09:00:00+00:00",
                "2024-05-04T09:00:00+00:00",
                "2024-05-05T09:00:00+00:00",
                "2024-05-10T09:00:00+00:00"
            ]
        );
        assert_eq!(
            fires("0 9 * * 5-7", "2024-05-01T00:00:00Z", 4),
            fires("0 9 * * FRI-SUN", "2024-05-01T00:00:00Z", 4)
        );
    }

    #[test]
    fn restricted_day_fields_match_either_and_a_starred_one_needs_both() {
        // The 10th or any Monday.
        assert_eq!(
            fires("0 0 10 * MON", "2024-05-01T00:00:00Z", 3),
            [
                "2024-05-06T00:00:00+00:00",
                "2024-05-10T00:00:00+00:00",
                "2024-05-13T00:00:00+00:00"
            ]
        );
        // Odd days that are Mondays.
        assert_eq!(
            fires("0 0 */2 * MON", "2024-05-01T00:00:00Z", 2),
            ["2024-05-13T00:00:00+00:00", "2024-05-27T00:00:00+00:00"]
        );
    }

    #[test]
    fn steps_lists_and_ranges_select_the_right_values() {
        assert_eq!(
            fires("*/20 * * * *", "2024-05-01T10:41:00Z", 4),
            [
                "2024-05-01T11:00:00+00:00",
                "2024-05-01T11:20:00+00:00",
                "2024-05-01T11:40:00+00:00",
                "2024-05-01T12:00:00+00:00"
            ]
        );
        assert_eq!(
            fires("15,45 8-17/4 * * *", "2024-05-01T16:50:00Z", 3),
            [
                "2024-05-02T08:15:00+00:00",
                "2024-05-02T08:45:00+00:00",
                "2024-05-02T12:15:00+00:00"
            ]
        );
        assert_eq!(
            fires("5/30 * * * *", "2024-05-01T00:00:00Z", 3),
            [
                "2024-05-01T00:05:00+00:00",
                "2024-05-01T00:35:00+00:00",
                "2024-05-01T01:05:00+00:00"
            ]
        );
        assert_eq!(
            fires("0 0 1 JAN-MAR/2 *", "2024-01-01T00:00:00Z", 3),
            [
                "2024-03-01T00:00:00+00:00",
                "2025-01-01T00:00:00+00:00",
                "2025-03-01T00:00:00+00:00"
            ]
        );
    }

    #[test]
    fn nicknames_stand_for_their_expressions() {
        let from = "2024-05-01T10:30:00Z";
        assert_eq!(fires("@daily", from, 2), fires("0 0 * * *", from, 2));
        assert_eq!(fires("@midnight", from, 1), fires("0 0 * * *", from, 1));
        assert_eq!(fires("@hourly", from, 2), fires("0 * * * *", from, 2));
        assert_eq!(fires("@weekly", from, 1), ["2024-05-05T00:00:00+00:00"]);
        assert_eq!(fires("@monthly", from, 1), ["2024-06-01T00:00:00+00:00"]);
        assert_eq!(fires("@yearly", from, 1), ["2025-01-01T00:00:00+00:00"]);
        assert_eq!(fires("@annually", from, 1), fires("@yearly", from, 1));
    }

    #[test]
    fn invalid_expressions_are_refused_naming_the_field() {
        for (expression, field) in [
            ("60 * * * *", "minute"),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day-of-month"),
            ("* * 32 * *", "day-of-month"),
            ("* * * 13 *", "month"),
            ("* * * FOO *", "month"),
            ("* * * * 8", "day-of-week"),
            ("* * * * FUNDAY", "day-of-week"),
            ("*/0 * * * *", "minute"),
            ("* */24 * * *", "hour"),
            ("* 5-2 * * *", "hour"),
            ("* * * * SAT-FRI", "day-of-week"),
            ("1,,2 * * * *", "minute"),
            ("-1 * * * *", "minute"),
            ("* * L * *", "day-of-month"),
            ("* * * * 5#2", "day-of-week"),
            ("* * * * MON-", "day-of-week"),
            ("0 0 30 2 *", "day-of-month"),
            ("0 0 31 APR,JUN *", "day-of-month"),
        ] {
            let message = refusal(expression);
            assert!(
                message.starts_with(&format!("{field}: ")),
                "{expression:?}: {message}"
            );
        }
    }

    #[test]
    fn wrong_field_counts_and_unknown_nicknames_are_refused() {
        assert!(refusal("").contains("5 fields"));
        assert!(refusal("0 3 * *").contains("has 4"));
        assert!(refusal("0 0 3 * * *").contains("has 6"));
        assert!(refusal("@reboot").contains("nickname"));
        assert!(refusal(&format!("0 3 * * {}", "1,".repeat(60))).contains("at most 100"));
    }

    #[test]
    fn a_thirtieth_is_accepted_when_some_month_has_it() {
        assert!(Schedule::parse("0 0 30 1,2 *").is_ok());
        // Both day fields restricted: every Friday of February matches.
        assert!(Schedule::parse("0 0 30 2 FRI").is_ok());
    }

    #[test]
    fn a_schedule_displays_and_serialises_as_given() {
        let schedule = Schedule::parse("0 3 * * MON-FRI").unwrap();
        assert_eq!(schedule.to_string(), "0 3 * * MON-FRI");
        assert_eq!(
            serde_json::to_string(&schedule).unwrap(),
            "\"0 3 * * MON-FRI\""
        );
        let back: Schedule = serde_json::from_str("\"0 3 * * MON-FRI\"").unwrap();
        assert_eq!(back, schedule);
        let err = serde_json::from_str::<Schedule>("\"0 25 * * *\"").unwrap_err();
        assert!(err.to_string().contains("hour"), "{err}");
    }

    #[test]
    fn the_end_of_representable_time_gives_no_next_fire() {
        let schedule = Schedule::parse("0 0 1 1 *").unwrap();
        assert_eq!(schedule.next_after(DateTime::<Utc>::MAX_UTC), None);
    }
}
