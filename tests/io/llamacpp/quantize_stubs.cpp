// Link stubs (tests/io/llamacpp/build_llama_quantize.sh) for building llama-quantize without the whole common library: llama-quantize never calls these
// (they belong to common.cpp's sampling / speculative / fit / unicode helpers); each aborts if reached.
#include "common.h"
#include "sampling.h"
#include "speculative.h"
#include "fit.h"
#include "unicode.h"
#include <cstdlib>
common_params common_base_params_to_speculative(const common_params &) { abort(); }
struct common_sampler * common_sampler_init(const struct llama_model *, struct common_params_sampling &) { abort(); }
void common_sampler_free(struct common_sampler *) { abort(); }
struct llama_sampler * common_sampler_get(const struct common_sampler *) { abort(); }
std::vector<enum common_sampler_type> common_sampler_types_from_names(const std::vector<std::string> &) { abort(); }
utf8_parse_result common_parse_utf8_codepoint(std::string_view, size_t) { abort(); }
common_params_fit_status common_fit_params(const char *, llama_model_params *, llama_context_params *, float *,
                                           llama_model_tensor_buft_override *, size_t *, uint32_t,
                                           const common_fit_extra_model *, ggml_log_level) { abort(); }
