// The generated text: determinism, shape (paragraphs, characters) and variety.
#include "services/engine/synth/synthetic_text.h"

#include <cctype>
#include <string>

#include "gtest/gtest.h"

namespace qcal::engine {
namespace {

TEST(SyntheticTextTest, SameSeedSameTextOtherSeedOtherText) {
  const std::string a = GenerateSyntheticText(5, 20000);
  EXPECT_EQ(a, GenerateSyntheticText(5, 20000));
  EXPECT_NE(a, GenerateSyntheticText(6, 20000));
  // A longer text from the same seed continues the shorter one.
  const std::string longer = GenerateSyntheticText(5, 40000);
  EXPECT_EQ(longer.substr(0, a.size()), a);
}

TEST(SyntheticTextTest, WholeParagraphsSeparatedByBlankLines) {
  const std::string t = GenerateSyntheticText(1, 30000);
  ASSERT_GE(t.size(), 30000u);
  EXPECT_LT(t.size(), 32000u);  // overshoots by less than one paragraph
  EXPECT_EQ(t.back(), '\n');
  EXPECT_EQ(t.find("\n\n\n"), std::string::npos);
  int paragraphs = 0;
  size_t pos = 0;
  while (pos < t.size()) {
    const size_t nl = t.find('\n', pos);
    ASSERT_NE(nl, std::string::npos);
    const std::string line = t.substr(pos, nl - pos);
    ASSERT_FALSE(line.empty()) << "at byte " << pos;
    const char first = line[0] == '"' ? line[1] : line[0];
    EXPECT_TRUE(std::isupper(static_cast<unsigned char>(first))) << line;
    EXPECT_TRUE(line.back() == '.' || line.back() == '?') << line;
    ++paragraphs;
    // Paragraph lines are followed by one empty line, except the last.
    pos = nl + 1;
    if (pos < t.size()) {
      ASSERT_EQ(t[pos], '\n') << "at byte " << pos;
      ++pos;
    }
  }
  EXPECT_GT(paragraphs, 30);
}

TEST(SyntheticTextTest, PrintableAsciiWithDigitsQuotesAndQuestions) {
  const std::string t = GenerateSyntheticText(2, 50000);
  for (char c : t) {
    ASSERT_TRUE(c == '\n' || (c >= ' ' && c <= '~')) << "byte " << static_cast<int>(c);
  }
  EXPECT_NE(t.find_first_of("0123456789"), std::string::npos);
  EXPECT_NE(t.find('?'), std::string::npos);
  EXPECT_NE(t.find(",\" said "), std::string::npos);
  EXPECT_NE(t.find("'s "), std::string::npos);
}

}  // namespace
}  // namespace qcal::engine
