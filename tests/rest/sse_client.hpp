// SPDX-License-Identifier: GPL-2.0-or-later
// A Server-Sent Events client for the tests: a blocking unix socket, HTTP/1.1 chunked decoding and
// the event-stream format (WHATWG HTML 9.2), read with deadlines. It may also not read at all (a
// slow reader).
#pragma once

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace qm::test {

// One message: its fields (a comment line is a message with only `comment`).
struct SseMessage
{
    std::string id;
    std::string event;
    std::string data;
    std::string comment;
};

class SseClient
{
public:
    // Connects and sends `GET target` (with `headers`, each "Name: value"); the answer's status
    // line and header are read by status().
    SseClient(const std::string& socket_path, const std::string& target,
              const std::vector<std::string>& headers = {})
    {
        fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        sockaddr_un addr{};
        addr.sun_family = AF_UNIX;
        std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", socket_path.c_str());
        if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
            error_ = std::string("connect: ") + std::strerror(errno);
            return;
        }
        std::string request = "GET " + target + " HTTP/1.1\r\nHost: qmachined\r\n";
        for (const auto& h : headers) {
            request += h + "\r\n";
        }
        request += "\r\n";
        if (::send(fd_, request.data(), request.size(), MSG_NOSIGNAL) !=
            static_cast<ssize_t>(request.size())) {
            error_ = std::string("send: ") + std::strerror(errno);
        }
    }
    ~SseClient() { close(); }
    SseClient(const SseClient&) = delete;
    SseClient& operator=(const SseClient&) = delete;

    void close()
    {
        if (fd_ >= 0) {
            ::close(fd_);
            fd_ = -1;
        }
    }
    const std::string& error() const { return error_; }

    // The status code (0 when the header did not come within `deadline`); the header is in
    // head(), and for a non-stream answer the body follows in body_so_far().
    int status(std::chrono::milliseconds deadline = std::chrono::seconds(10))
    {
        const auto end = std::chrono::steady_clock::now() + deadline;
        while (head_.empty()) {
            const auto blank = raw_.find("\r\n\r\n");
            if (blank != std::string::npos) {
                head_ = raw_.substr(0, blank + 4);
                raw_.erase(0, blank + 4);
                break;
            }
            if (!fill(end)) {
                return 0;
            }
        }
        int code = 0;
        std::sscanf(head_.c_str(), "HTTP/1.1 %d", &code);
        return code;
    }
    const std::string& head() const { return head_; }
    const std::string& body_so_far() const { return raw_; }

    // The next message (comments included), or nullopt when none came within `deadline` or the
    // stream ended (ended() then says so).
    std::optional<SseMessage> next(std::chrono::milliseconds deadline = std::chrono::seconds(10))
    {
        const auto end = std::chrono::steady_clock::now() + deadline;
        if (status(deadline) == 0) {
            return std::nullopt;
        }
        for (;;) {
            const auto blank = text_.find("\n\n");
            if (blank != std::string::npos) {
                const std::string block = text_.substr(0, blank);
                text_.erase(0, blank + 2);
                return parse(block);
            }
            if (ended_ || !decode_chunk(end)) {
                return std::nullopt;
            }
        }
    }
    // The next message that is not a comment.
    std::optional<SseMessage> next_event(std::chrono::milliseconds deadline = std::chrono::seconds(10))
    {
        const auto end = std::chrono::steady_clock::now() + deadline;
        for (;;) {
            auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                end - std::chrono::steady_clock::now());
            auto m = next(std::max(left, std::chrono::milliseconds(0)));
            if (!m || m->comment.empty()) {
                return m;
            }
        }
    }
    // The stream's last chunk came (the server ended it cleanly).
    bool ended() const { return ended_; }

private:
    static SseMessage parse(const std::string& block)
    {
        SseMessage m;
        std::size_t pos = 0;
        while (pos <= block.size()) {
            auto nl = block.find('\n', pos);
            if (nl == std::string::npos) {
                nl = block.size();
            }
            const std::string line = block.substr(pos, nl - pos);
            pos = nl + 1;
            if (line.empty()) {
                continue;
            }
            if (line[0] == ':') {
                m.comment = line.substr(1);
                continue;
            }
            const auto colon = line.find(": ");
            const std::string field = line.substr(0, colon);
            const std::string value = colon == std::string::npos ? "" : line.substr(colon + 2);
            if (field == "id") {
                m.id = value;
            } else if (field == "event") {
                m.event = value;
            } else if (field == "data") {
                m.data += value;
            }
        }
        return m;
    }

    // Moves one chunk's data from raw_ to text_ (RFC 9112 7.1); false on deadline or EOF.
    bool decode_chunk(std::chrono::steady_clock::time_point end)
    {
        for (;;) {
            const auto crlf = raw_.find("\r\n");
            if (crlf != std::string::npos) {
                const std::size_t size = std::stoul(raw_.substr(0, crlf), nullptr, 16);
                if (raw_.size() >= crlf + 2 + size + 2) {
                    text_ += raw_.substr(crlf + 2, size);
                    raw_.erase(0, crlf + 2 + size + 2);
                    if (size == 0) {
                        ended_ = true;
                    }
                    return true;
                }
            }
            if (!fill(end)) {
                return false;
            }
        }
    }

    bool fill(std::chrono::steady_clock::time_point end)
    {
        if (fd_ < 0) {
            return false;
        }
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            end - std::chrono::steady_clock::now());
        if (left.count() <= 0) {
            return false;
        }
        pollfd p{fd_, POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) {
            return false;
        }
        char buf[65536];
        const ssize_t n = ::recv(fd_, buf, sizeof buf, 0);
        if (n <= 0) {
            return false;
        }
        raw_.append(buf, static_cast<std::size_t>(n));
        return true;
    }

    int fd_ = -1;
    std::string error_;
    std::string raw_;  // bytes received, not yet decoded
    std::string head_; // the status line and header
    std::string text_; // the event stream, decoded from its chunks
    bool ended_ = false;
};

} // namespace qm::test
