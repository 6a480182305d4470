#include "services/engine/synth/synthetic_text.h"

#include <cctype>
#include <initializer_list>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/text_data.h"

namespace qcal::engine {
namespace {

// Word lists. Every noun takes a regular plural and every verb a regular past tense and gerund
// (no consonant doubling), so the inflection rules below stay small. Earlier entries are drawn
// more often.
constexpr const char* kNames[] = {
    "Anna",  "Ben",  "Clara", "David", "Elena", "Farid", "Grace", "Hugo",   "Ines",
    "Jonas", "Kira", "Leo",   "Maya",  "Noah",  "Olga",  "Pavel", "Quinn",  "Rosa",
    "Sam",   "Tara", "Uma",   "Wen",   "Yara",  "Zoe",   "Lily",  "Oscar",  "Mia",
    "Tom",   "Nina", "Omar",  "Ivy",   "Felix", "Hana",  "Ravi",  "Victor", "Xavier"};
constexpr const char* kNouns[] = {
    "river",    "city",     "garden",  "engine",   "letter",  "window",  "market", "teacher",
    "farmer",   "bridge",   "village", "mountain", "forest",  "ship",    "storm",  "lamp",
    "road",     "book",     "table",   "harbor",   "bird",    "horse",   "dog",    "cat",
    "doctor",   "baker",    "soldier", "painter",  "student", "machine", "clock",  "door",
    "field",    "island",   "valley",  "tower",    "castle",  "station", "train",  "school",
    "library",  "kitchen",  "apple",   "basket",   "blanket", "bottle",  "candle", "carpet",
    "cloud",    "coat",     "corner",  "desk",     "dragon",  "drawer",  "farm",   "feather",
    "flower",   "friend",   "gate",    "glove",    "hammer",  "hill",    "house",  "jacket",
    "key",      "lake",     "ladder",  "lantern",  "map",     "meadow",  "mirror", "monkey",
    "neighbor", "notebook", "ocean",   "orange",   "owl",     "packet",  "pencil", "pocket",
    "puzzle",   "rabbit",   "robot",   "roof",     "sailor",  "shadow",  "signal", "song",
    "spoon",    "stone",    "street",  "sweater",  "ticket",  "tiger",   "tree",   "tunnel",
    "umbrella", "wagon",    "wall",    "whistle",  "wizard",  "bench",   "box",    "brush",
    "fox",      "glass",    "bus",     "story",    "berry",   "factory", "toy"};
constexpr const char* kAdjectives[] = {
    "old",      "young",   "small",  "large",  "quiet",  "loud",     "bright", "dark",   "happy",
    "tired",    "brave",   "clever", "gentle", "heavy",  "light",    "warm",   "cold",   "green",
    "red",      "blue",    "yellow", "silver", "golden", "wooden",   "empty",  "busy",   "careful",
    "strange",  "famous",  "hungry", "narrow", "wide",   "ancient",  "modern", "simple", "curious",
    "friendly", "patient", "proud",  "rusty",  "shiny",  "sleepy",   "soft",   "sharp",  "smooth",
    "tall",     "short",   "thin",   "wild",   "calm",   "cheerful", "dusty",  "fresh",  "gray",
    "hidden",   "lonely",  "lucky",  "noisy",  "polite", "rapid"};
constexpr const char* kTransitive[] = {
    "open",   "watch",   "paint",    "visit",    "follow",   "carry",   "clean",   "help",
    "call",   "answer",  "count",    "cover",    "enter",    "fix",     "guard",   "join",
    "lift",   "mark",    "move",     "need",     "order",    "pack",    "pick",    "pull",
    "push",   "reach",   "repair",   "save",     "share",    "start",   "test",    "touch",
    "track",  "turn",    "use",      "wash",     "borrow",   "deliver", "explore", "finish",
    "gather", "greet",   "hunt",     "inspect",  "kick",     "lock",    "measure", "notice",
    "polish", "protect", "question", "record",   "remember", "rescue",  "study",   "warn",
    "climb",  "collect", "describe", "discover", "fold",     "invite",  "load",    "mend",
    "print"};
constexpr const char* kIntransitive[] = {
    "walk",  "smile", "laugh",  "rest",   "work",   "travel", "listen", "wait",    "jump",
    "dance", "shout", "arrive", "return", "stay",   "play",   "wander", "whisper", "hurry",
    "cry",   "yawn",  "relax",  "cough",  "sneeze", "pause",  "rush",   "struggle"};
constexpr const char* kAdverbs[] = {
    "quickly",   "slowly",  "quietly", "carefully", "suddenly", "happily",   "gently",   "loudly",
    "patiently", "proudly", "calmly",  "bravely",   "eagerly",  "nervously", "politely", "softly",
    "together",  "again",   "early",   "late",      "alone",    "briefly",   "finally"};
constexpr const char* kPrepositions[] = {"in",     "near",   "behind", "under",  "beside",
                                         "across", "around", "inside", "beyond", "along"};
constexpr const char* kTimes[] = {
    "in the morning", "at night",       "at noon",     "in the evening", "before dawn",
    "after dinner",   "last winter",    "next summer", "on Monday",      "on Tuesday",
    "on Wednesday",   "on Thursday",    "on Friday",   "on Saturday",    "on Sunday",
    "every day",      "that afternoon", "yesterday",   "today",          "at midnight"};
constexpr const char* kPeriods[] = {"Monday", "Friday", "morning", "evening", "week",
                                    "year",   "Sunday", "night",   "summer",  "winter"};
constexpr const char* kConjunctions[] = {"because", "although", "while", "after",
                                         "before",  "when",     "until", "since"};
constexpr const char* kPossessives[] = {"his", "her", "their", "our", "my", "your"};
constexpr const char* kPronouns[] = {"he", "she", "they", "we", "I", "you"};

bool EndsWith(const std::string& s, const char* suffix) {
  const std::string suf(suffix);
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

bool IsVowel(char c) { return c == 'a' || c == 'e' || c == 'i' || c == 'o' || c == 'u'; }

// A word ending in a consonant followed by "y" (city, carry): y becomes "ie" before s/d.
bool ConsonantY(const std::string& w) {
  return w.size() >= 2 && w.back() == 'y' && !IsVowel(w[w.size() - 2]);
}

// Sibilant endings take "es" (box, brush, glass, reach).
bool Sibilant(const std::string& w) {
  return EndsWith(w, "s") || EndsWith(w, "x") || EndsWith(w, "ch") || EndsWith(w, "sh");
}

std::string Plural(const std::string& w) {
  if (ConsonantY(w)) return w.substr(0, w.size() - 1) + "ies";
  return w + (Sibilant(w) ? "es" : "s");
}

std::string ThirdPerson(const std::string& v) { return Plural(v); }

std::string Past(const std::string& v) {
  if (ConsonantY(v)) return v.substr(0, v.size() - 1) + "ied";
  return v + (v.back() == 'e' ? "d" : "ed");
}

std::string Gerund(const std::string& v) {
  if (v.back() == 'e' && !EndsWith(v, "ee")) return v.substr(0, v.size() - 1) + "ing";
  return v + "ing";
}

std::string WithArticle(const std::string& w) { return (IsVowel(w[0]) ? "an " : "a ") + w; }

// Upper-cases the first letter (after an opening quote, if any).
std::string Capitalize(std::string s) {
  for (char& c : s) {
    if (std::isalpha(static_cast<unsigned char>(c))) {
      c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      break;
    }
  }
  return s;
}

// Concatenates in order. Every random draw of a sentence goes through one braced list, whose
// elements are evaluated left to right; the operands of `+` and the arguments of a call are not
// ordered, and the text must not depend on the compiler's choice.
std::string Cat(std::initializer_list<std::string> parts) {
  std::string out;
  for (const std::string& p : parts) out += p;
  return out;
}

class Writer {
 public:
  explicit Writer(uint64_t seed) : rng_(seed) {}

  std::string Paragraph() {
    const int n = 3 + static_cast<int>(Below(5));
    std::string p;
    for (int i = 0; i < n; ++i) {
      if (i > 0) p += ' ';
      p += Capitalize(Sentence());
    }
    return p;
  }

 private:
  uint64_t Below(uint64_t n) { return rng_.Next() % n; }
  bool Chance(int percent) { return Below(100) < static_cast<uint64_t>(percent); }

  // Index floor(n·u²) for uniform u: density ∝ 1/sqrt(i), a Zipf-like fall-off over the list.
  std::string Pick(std::span<const char* const> list) {
    const double u = static_cast<double>(rng_.Next() >> 11) * 0x1p-53;
    return list[static_cast<size_t>(u * u * static_cast<double>(list.size()))];
  }

  std::string Number() { return absl::StrCat(2 + Below(998)); }
  std::string Noun() { return Pick(kNouns); }
  std::string Adjective() { return Pick(kAdjectives); }
  std::string Name() { return Pick(kNames); }
  std::string Adverb() { return Pick(kAdverbs); }
  std::string Time() { return Pick(kTimes); }
  std::string Transitive() { return Pick(kTransitive); }
  std::string IntransitivePast() { return Past(Pick(kIntransitive)); }
  std::string TransitivePast() { return Past(Pick(kTransitive)); }

  // "the river", "the quiet river", "an old river", "her river", "12 rivers" or "a river".
  std::string NounPhrase() {
    switch (Below(6)) {
      case 0:
        return "the " + Noun();
      case 1:
        return Cat({"the ", Adjective(), " ", Noun()});
      case 2:
        return WithArticle(Cat({Adjective(), " ", Noun()}));
      case 3:
        return Cat({Pick(kPossessives), " ", Noun()});
      case 4:
        return Cat({Number(), " ", Plural(Noun())});
      default:
        return WithArticle(Noun());
    }
  }

  // A singular third-person subject: a name or "the (adjective) noun".
  std::string SingularSubject() {
    if (Chance(50)) return Name();
    return Chance(50) ? "the " + Noun() : Cat({"the ", Adjective(), " ", Noun()});
  }

  std::string Subject() { return Chance(25) ? Pick(kPronouns) : SingularSubject(); }

  std::string Place() { return Cat({Pick(kPrepositions), " the ", Noun()}); }

  std::string Sentence() {
    switch (Below(14)) {
      case 0:
        return Cat({Subject(), " ", TransitivePast(), " ", NounPhrase(), " ", Place(), "."});
      case 1:
        return Cat({Subject(), " ", IntransitivePast(), " ", Adverb(), " ", Time(), "."});
      case 2:
        return Cat({"when ", Subject(), " ", TransitivePast(), " ", NounPhrase(), ", ", Subject(),
                    " ", IntransitivePast(), " ", Adverb(), "."});
      case 3:
        return Cat({"the ", Adjective(), " ", Noun(), " was ", Adjective(), " ",
                    Pick(kConjunctions), " ", Subject(), " ", TransitivePast(), " ", NounPhrase(),
                    "."});
      case 4:
        return Cat({"did ", Subject(), " ", Transitive(), " ", NounPhrase(), " ", Time(), "?"});
      case 5:
        return Cat({"\"", Capitalize(Subject()), " ", IntransitivePast(), " ", Place(), ",\" said ",
                    Name(), "."});
      case 6:
        return Cat({Name(), " counted ", Number(), " ", Adjective(), " ", Plural(Noun()), " ",
                    Place(), "."});
      case 7:
        return Cat({"there were ", Number(), " ", Plural(Noun()), " ", Place(), " ", Time(), "."});
      case 8:
        return Cat({SingularSubject(), " ", ThirdPerson(Transitive()), " ", NounPhrase(), " every ",
                    Pick(kPeriods), "."});
      case 9:
        return Cat({Subject(), " ", TransitivePast(), " ", NounPhrase(), " ", Adverb(), ", and ",
                    Subject(), " ", IntransitivePast(), " ", Time(), "."});
      case 10:
        return Cat({"why was the ", Noun(), " so ", Adjective(), "?"});
      case 11:
        return Cat({SingularSubject(), " was ", Gerund(Transitive()), " ", NounPhrase(), " ",
                    Place(), " when ", Subject(), " ", IntransitivePast(), "."});
      case 12:
        return Cat({"in ", absl::StrCat(1800 + Below(231)), ", ", Subject(), " ", TransitivePast(),
                    " ", Number(), " ", Plural(Noun()), "."});
      default:
        return Cat({Name(), "'s ", Noun(), " was ", Adjective(), ", but the ", Noun(), " was ",
                    Adjective(), "."});
    }
  }

  SplitMix64 rng_;
};

}  // namespace

std::string GenerateSyntheticText(uint64_t seed, size_t min_bytes) {
  Writer writer(seed);
  std::string text;
  while (text.size() < min_bytes) {
    if (!text.empty()) text += '\n';
    text += writer.Paragraph();
    text += '\n';
  }
  return text;
}

}  // namespace qcal::engine
