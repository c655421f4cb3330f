/* libFuzzer target: the frame header parsers of src/cargohold/core/_frames.c, without
 * Python, under AddressSanitizer and UndefinedBehaviorSanitizer
 * (tests/unit/test_frames.py builds it with clang and runs it for a bounded time).
 * Every input is parsed as a request and as a response header at every offset of its first
 * bytes; what a parser accepts must hold what the protocol allows. */
#define FRAMES_WITHOUT_PYTHON
#include "../../src/cargohold/core/_frames.c"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    for (size_t offset = 0; offset <= size && offset < 64; offset++) {
        struct request_header request;
        struct response_header response;
        enum frame_error e = parse_request(data + offset, size - offset, &request);
        if (e == FRAME_OK && (request.magic[0] != 'C' || request.magic[1] != 'H' ||
                              request.version != FRAME_VERSION ||
                              request.payload_length > FRAME_MAX_PAYLOAD))
            abort();
        if (e != FRAME_SHORT && size - offset < REQUEST_SIZE)
            abort();
        e = parse_response(data + offset, size - offset, &response);
        if (e == FRAME_OK && (response.version != FRAME_VERSION ||
                              response.payload_length > FRAME_MAX_PAYLOAD))
            abort();
        if (e != FRAME_SHORT && size - offset < RESPONSE_SIZE)
            abort();
    }
    return 0;
}
