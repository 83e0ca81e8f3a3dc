//! Removes personal data from text kept in the audit trail: e-mail addresses, phone, card and IBAN numbers become a hash and a length.

use std::borrow::Cow;
use std::sync::OnceLock;

use regex::Regex;
use sha2::{Digest, Sha256};

/// Kinds of personal data, each switchable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redaction {
    pub email: bool,
    pub phone: bool,
    pub card: bool,
    pub iban: bool,
}

impl Default for Redaction {
    fn default() -> Self {
        Redaction { email: true, phone: true, card: true, iban: true }
    }
}

impl Redaction {
    pub const NONE: Redaction = Redaction { email: false, phone: false, card: false, iban: false };

    /// Parses a comma-separated list such as `email,phone,card,iban`, `all` or `none`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut r = Redaction::NONE;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => r = Redaction::default(),
                "none" => r = Redaction::NONE,
                "email" => r.email = true,
                "phone" => r.phone = true,
                "card" => r.card = true,
                "iban" => r.iban = true,
                other => return Err(format!("unknown redaction {other:?}: use email, phone, card, iban, all or none")),
            }
        }
        Ok(r)
    }

    /// `text` with every enabled kind of personal data replaced by
    /// `[kind:<8 hex of its SHA-256>:<length>]`.
    ///
    /// Each pattern needs something most text lacks (an e-mail address an
    /// `@`, an IBAN 2 digits, a phone number 7 and a card 13), and counting
    /// those is much cheaper than running the pattern, so a pattern runs only
    /// on text that has them. Digits are counted as the patterns' `\d` sees
    /// them (any script's), and again after a replacement, whose hash adds
    /// some, so the result is what running every pattern would give.
    pub fn apply(&self, text: &str) -> String {
        let digits = |t: &str| {
            if t.is_ascii() {
                t.bytes().filter(u8::is_ascii_digit).count()
            } else {
                t.chars().filter(|c| c.is_numeric()).count()
            }
        };
        let mut out = Cow::Borrowed(text);
        // Order matters: IBANs and cards contain digit runs a phone pattern would take.
        if self.email && out.contains('@') {
            out = replace(out, email(), "email", |_| true);
        }
        if self.iban && digits(&out) >= 2 {
            out = replace(out, iban(), "iban", |_| true);
        }
        if self.card && digits(&out) >= 13 {
            out = replace(out, card(), "card", luhn);
        }
        if self.phone && digits(&out) >= 7 {
            out = replace(out, phone(), "phone", |m| m.chars().filter(char::is_ascii_digit).count() >= 7);
        }
        out.into_owned()
    }
}

/// A connection URL with its password replaced by `***`, fit to show in errors.
pub fn url_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(c) => format!("{}:***{}", &url[..s + 3 + c], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

fn replace<'a>(text: Cow<'a, str>, re: &Regex, kind: &str, accept: impl Fn(&str) -> bool) -> Cow<'a, str> {
    let replaced = re.replace_all(&text, |c: &regex::Captures| {
        let m = &c[0];
        if !accept(m) {
            return m.to_string();
        }
        let hash = hex::encode(Sha256::digest(m.as_bytes()));
        format!("[{kind}:{}:{}]", &hash[..8], m.chars().count())
    });
    match replaced {
        Cow::Borrowed(_) => text,
        Cow::Owned(s) => Cow::Owned(s),
    }
}

fn email() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}").expect("valid regex"))
}

fn iban() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b").expect("valid regex"))
}

fn card() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\b(?:\d[ -]?){12,18}\d\b").expect("valid regex"))
}

fn phone() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}").expect("valid regex")
    })
}

/// The Luhn checksum that every payment card number satisfies.
fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, gone: &[&str], kept: &[&str]) {
        let out = Redaction::default().apply(input);
        for g in gone {
            assert!(!out.contains(g), "{g:?} survived in {out:?}");
        }
        for k in kept {
            assert!(out.contains(k), "{k:?} lost from {out:?}");
        }
    }

    #[test]
    fn personal_data_is_replaced_by_hash_and_length() {
        check("mail jane.doe@example.com now", &["jane.doe@example.com"], &["[email:", ":20]", "mail", "now"]);
        check("call +44 20 7946 0958 today", &["7946 0958"], &["[phone:", "today"]);
        check("card 4111 1111 1111 1111 ok", &["4111 1111 1111 1111"], &["[card:", "ok"]);
        check("iban DE89 3704 0044 0532 0130 00 end", &["3704 0044"], &["[iban:", "end"]);
        check("iban GB82WEST12345698765432", &["GB82WEST12345698765432"], &["[iban:"]);
    }

    #[test]
    fn ordinary_text_and_numbers_stay() {
        check("The striker scored 2 goals in 2024 at 3 pm.", &[], &["2 goals in 2024 at 3 pm"]);
        // Not a valid card number (Luhn fails) and too short for a phone.
        let out = Redaction { phone: false, ..Default::default() }.apply("order 1234 5678 9012 3456");
        assert!(out.contains("1234 5678 9012 3456"), "{out}");
    }

    /// Every pattern run on every text, as `apply` did before it counted first.
    fn apply_all(text: &str) -> String {
        let out = replace(Cow::Borrowed(text), email(), "email", |_| true);
        let out = replace(out, iban(), "iban", |_| true);
        let out = replace(out, card(), "card", luhn);
        replace(out, phone(), "phone", |m| m.chars().filter(char::is_ascii_digit).count() >= 7).into_owned()
    }

    #[test]
    fn skipping_patterns_that_cannot_match_changes_nothing() {
        let texts = [
            "no digits and no at sign",
            "a@b.co",
            "x@y.org 12 34",
            "1@2.io and 555 0100",
            "DE89 3704 0044 0532 0130 00",
            "12 goals",
            "call 030 1234 567",
            "123456",
            "1234567",
            "4111 1111 1111 1111 and jane@example.com",
            "GB82WEST12345698765432 to +44 20 7946 0958",
            "DE\u{0668}\u{0669} ABCD EFGH, its only digits Arabic-Indic",
            "",
        ];
        for t in texts {
            assert_eq!(Redaction::default().apply(t), apply_all(t), "{t:?}");
        }
        assert!(Redaction::default().apply("DE\u{0668}\u{0669} ABCD EFGH").starts_with("[iban:"));
        let sample = crate::sample::document(3, 42)["text"].as_str().unwrap().to_string();
        assert_eq!(Redaction::default().apply(&sample), apply_all(&sample));
    }

    #[test]
    fn the_same_value_gets_the_same_hash() {
        let a = Redaction::default().apply("a@b.co");
        assert_eq!(a, Redaction::default().apply("a@b.co"));
        assert_ne!(a, Redaction::default().apply("c@d.co"));
    }

    #[test]
    fn passwords_leave_urls() {
        assert_eq!(
            url_password("postgres://sluice:secret@127.0.0.1:5432/sluice"),
            "postgres://sluice:***@127.0.0.1:5432/sluice"
        );
        assert_eq!(url_password("postgres://127.0.0.1/db"), "postgres://127.0.0.1/db");
        assert_eq!(url_password("postgres://user@host/db"), "postgres://user@host/db");
    }

    #[test]
    fn parsing_the_setting() {
        assert_eq!(Redaction::parse("all").unwrap(), Redaction::default());
        assert_eq!(Redaction::parse("none").unwrap(), Redaction::NONE);
        assert_eq!(Redaction::parse("email, iban").unwrap(), Redaction { email: true, iban: true, ..Redaction::NONE });
        assert!(Redaction::parse("ssn").is_err());
    }
}
