#include "services/engine/gang/transport.h"

#include "absl/strings/str_cat.h"

namespace qcal::engine {

std::string DescribeKey(const MessageKey& key) {
  static const char* const kKinds[] = {"partials",
                                       "statistic",
                                       "layer",
                                       "control",
                                       "output-adaptive partials",
                                       "retraining base",
                                       "retraining samples",
                                       "retrained layer",
                                       "token counts"};
  return absl::StrCat("block ", key.block, " step ", key.step, " ",
                      kKinds[static_cast<int>(key.kind)], " ", key.item, " from rank ", key.from);
}

}  // namespace qcal::engine
