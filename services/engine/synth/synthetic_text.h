// Deterministic pseudo-English text for synthetic checkpoints: the calibration and evaluation texts
// that `qcal synth` writes beside the model, and the corpus its tokenizer is trained on.
//
// The generator draws from a SplitMix64 stream: a fixed vocabulary (names, nouns, adjectives,
// verbs, adverbs, places, times) with regular English inflection, fourteen sentence templates
// (statements, subordinate clauses, questions, quoted speech, counts written in digits), word
// choice skewed toward the front of each list so that frequencies fall off like natural text.
// Sentences of a paragraph share one line; paragraphs are separated by one blank line. The text is
// printable ASCII and ends with a newline. Output depends only on the seed and the size asked for.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace qcal::engine {

// Whole paragraphs until the text holds at least `min_bytes` bytes (so it overshoots by less than
// one paragraph, a few hundred bytes). Same (seed, min_bytes), same string; a longer text with the
// same seed begins with the shorter one.
std::string GenerateSyntheticText(uint64_t seed, size_t min_bytes);

}  // namespace qcal::engine
