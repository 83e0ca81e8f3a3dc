//! Cutting a long text into segments that fit a model's context: by tokens, on paragraph boundaries where possible, with overlap.
//!
//! Tokens are counted as the estimator counts them for models without a
//! tokenizer of their own: four bytes a token ([`BYTES_PER_TOKEN`]). A
//! segment of `segment_tokens` therefore holds at most `4 × segment_tokens`
//! bytes, overlap included. The text is cut where it breaks most naturally:
//! between paragraphs (a blank line), else between sentences, else between
//! words, and only a word longer than a whole segment is cut inside (on a
//! character boundary). The same text always gives the same segments, so a
//! resumed item finds the segments it had.

/// Bytes counted as one token.
pub const BYTES_PER_TOKEN: usize = 4;

/// The segments of `text`: each at most `segment_tokens` tokens, each after
/// the first beginning with up to `overlap_tokens` tokens of the one before
/// it (cut at a word boundary). A text that fits is one segment; an empty
/// text is one empty segment.
pub fn split(text: &str, segment_tokens: u32, overlap_tokens: u32) -> Vec<String> {
    let max = (segment_tokens as usize * BYTES_PER_TOKEN).max(1);
    let overlap = (overlap_tokens as usize * BYTES_PER_TOKEN).min(max / 2);
    if text.len() <= max {
        return vec![text.to_string()];
    }
    let units = units(text, max - overlap);
    let mut segments: Vec<String> = Vec::new();
    let mut current = String::new();
    for (sep, unit) in units {
        let budget = if segments.is_empty() { max } else { max - overlap };
        if !current.is_empty() && current.len() + sep.len() + unit.len() > budget {
            segments.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push_str(sep);
        }
        current.push_str(unit);
    }
    if !current.is_empty() || segments.is_empty() {
        segments.push(current);
    }
    // Each segment after the first starts with the end of the one before.
    let bodies = segments.clone();
    for i in 1..segments.len() {
        let tail = tail(&bodies[i - 1], overlap);
        if !tail.is_empty() {
            segments[i] = format!("{tail} {}", bodies[i]);
        }
    }
    segments
}

/// The text's pieces no longer than `max` bytes, each with the separator
/// that preceded it: paragraphs, or the sentences, words or character runs
/// of those that are too long.
fn units(text: &str, max: usize) -> Vec<(&'static str, &str)> {
    let mut out = Vec::new();
    for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        if para.len() <= max {
            out.push(("\n\n", para));
            continue;
        }
        let mut first = true;
        for sentence in sentences(para) {
            let sep = if first { "\n\n" } else { " " };
            first = false;
            if sentence.len() <= max {
                out.push((sep, sentence));
                continue;
            }
            let mut sep = sep;
            for word in sentence.split_whitespace() {
                let mut rest = word;
                while rest.len() > max {
                    let mut cut = max;
                    while !rest.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    out.push((sep, &rest[..cut]));
                    sep = "";
                    rest = &rest[cut..];
                }
                out.push((sep, rest));
                sep = " ";
            }
        }
    }
    out
}

/// The sentences of a paragraph: cut after `.`, `!` or `?` followed by
/// whitespace, each trimmed.
fn sentences(para: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = para.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if matches!(b, b'.' | b'!' | b'?') && bytes.get(i + 1).is_some_and(u8::is_ascii_whitespace) {
            out.push(para[start..=i].trim());
            start = i + 1;
        }
    }
    let rest = para[start..].trim();
    if !rest.is_empty() {
        out.push(rest);
    }
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

/// The last words of `text` within `bytes` bytes.
fn tail(text: &str, bytes: usize) -> &str {
    if bytes == 0 {
        return "";
    }
    if text.len() <= bytes {
        return text;
    }
    let mut start = text.len() - bytes;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let cut = &text[start..];
    // Start at the next word, unless that leaves nothing.
    match cut.find(char::is_whitespace) {
        Some(i) if !cut[i..].trim().is_empty() => cut[i..].trim_start(),
        _ => cut,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paragraphs(n: usize, words: usize) -> String {
        (0..n)
            .map(|p| (0..words).map(|w| format!("p{p}w{w}")).collect::<Vec<_>>().join(" ") + ".")
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    #[test]
    fn a_text_that_fits_is_one_segment() {
        assert_eq!(split("short text", 100, 10), ["short text"]);
        assert_eq!(split("", 100, 10), [""]);
    }

    #[test]
    fn segments_fit_and_break_between_paragraphs() {
        // Paragraphs of about 60 bytes; segments of 40 tokens (160 bytes).
        let text = paragraphs(10, 10);
        let segs = split(&text, 40, 0);
        assert!(segs.len() >= 4, "{segs:?}");
        for s in &segs {
            assert!(s.len() <= 160, "{} bytes: {s:?}", s.len());
            // Every segment is whole paragraphs.
            assert!(s.starts_with('p') && s.ends_with('.'), "{s:?}");
        }
        // Nothing lost, nothing repeated: the segments are the paragraphs in order.
        let joined = segs.join("\n\n");
        assert_eq!(joined, text);
    }

    #[test]
    fn overlap_repeats_the_end_of_the_segment_before_within_the_limit() {
        let text = paragraphs(10, 10);
        let segs = split(&text, 40, 8);
        for pair in segs.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            assert!(after.len() <= 160, "{} bytes", after.len());
            let first_word = after.split_whitespace().next().unwrap();
            assert!(before.contains(first_word), "{after:?} should start with the end of {before:?}");
        }
        let plain = split(&text, 40, 0);
        assert!(segs.len() >= plain.len());
    }

    #[test]
    fn long_paragraphs_break_between_sentences_then_words_then_characters() {
        let sentences = "One two three four five. Six seven eight nine ten. Eleven twelve thirteen.";
        let segs = split(sentences, 8, 0); // 32 bytes
        assert!(segs.iter().all(|s| s.len() <= 32), "{segs:?}");
        assert_eq!(segs[0], "One two three four five.");
        let word = "x".repeat(100);
        let segs = split(&word, 10, 0); // 40 bytes
        assert_eq!(segs.iter().map(String::len).collect::<Vec<_>>(), [40, 40, 20]);
        // Never cut inside a character.
        let wide = "é".repeat(30); // 60 bytes
        let segs = split(&wide, 5, 0); // 20 bytes
        assert_eq!(segs.concat(), wide);
    }

    #[test]
    fn the_same_text_always_gives_the_same_segments() {
        let text = paragraphs(7, 13);
        assert_eq!(split(&text, 30, 5), split(&text, 30, 5));
    }
}
