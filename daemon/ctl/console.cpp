// SPDX-License-Identifier: GPL-2.0-or-later
// qmachinectl console: the terminal in raw mode (restored by RAII on every way out), the
// WebSocket's messages to stdout, stdin's bytes to the WebSocket, the escape key and the signals.
#include "daemon/ctl/console.hpp"

#include <array>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include <fcntl.h>
#include <termios.h>
#include <unistd.h>

#include <fmt/format.h>

namespace qm::ctl {

namespace websocket = rest::websocket;
namespace beast = rest::beast;

std::optional<char> parse_escape(std::string_view text)
{
    if (text == "none") {
        return '\0';
    }
    if (text.size() == 2 && text[0] == '^') {
        const char c = text[1];
        if (c >= 'a' && c <= 'z') {
            return static_cast<char>(c - 'a' + 1);
        }
        if (c >= '@' && c <= '_') { // ^@ ^A..^Z ^[ ^\ ^] ^^ ^_
            return static_cast<char>(c - '@');
        }
    }
    return std::nullopt;
}

namespace {

std::string escape_name(char c)
{
    return fmt::format("^{}", static_cast<char>(c + '@'));
}

// The terminal on stdin in raw mode (cfmakeraw: no echo, no line editing, no signals from keys,
// output as it comes) for the guard's lifetime, and stdin's file status flags (the loop makes the
// descriptor non-blocking, which the shell shares) restored with it.
class TerminalGuard
{
public:
    explicit TerminalGuard(bool raw)
    {
        flags_ = ::fcntl(STDIN_FILENO, F_GETFL);
        if (raw && ::tcgetattr(STDIN_FILENO, &saved_) == 0) {
            termios t = saved_;
            ::cfmakeraw(&t);
            t.c_cc[VMIN] = 1;
            t.c_cc[VTIME] = 0;
            raw_ = ::tcsetattr(STDIN_FILENO, TCSAFLUSH, &t) == 0;
        }
    }
    ~TerminalGuard()
    {
        if (raw_) {
            ::tcsetattr(STDIN_FILENO, TCSADRAIN, &saved_);
        }
        if (flags_ >= 0) {
            ::fcntl(STDIN_FILENO, F_SETFL, flags_);
        }
    }
    TerminalGuard(const TerminalGuard&) = delete;
    TerminalGuard& operator=(const TerminalGuard&) = delete;

    bool raw() const { return raw_; }

private:
    termios saved_{};
    int flags_ = -1;
    bool raw_ = false;
};

// Writes all of `bytes` to `fd`; false when it cannot (a closed pipe: SIGPIPE is ignored).
bool write_all(int fd, std::string_view bytes)
{
    while (!bytes.empty()) {
        const ssize_t n = ::write(fd, bytes.data(), bytes.size());
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN) {
                // stdout shares stdin's non-blocking terminal: wait until it takes more.
                fd_set w;
                FD_ZERO(&w);
                FD_SET(fd, &w);
                ::select(fd + 1, nullptr, &w, nullptr, nullptr);
                continue;
            }
            return false;
        }
        bytes.remove_prefix(static_cast<std::size_t>(n));
    }
    return true;
}

// One console session on the client's loop (callbacks; one WebSocket write at a time: the data
// from stdin, then the close).
class Session
{
public:
    // `signals` (SIGINT, SIGTERM, SIGHUP) were taken before the terminal went raw.
    Session(asio::io_context& ioc, WebSocket& ws, const ConsoleOptions& options, bool raw,
            asio::signal_set& signals)
        : ws_(ws)
        , options_(options)
        , raw_(raw)
        , signals_(signals)
        , input_(ioc)
        , close_timer_(ioc)
    {}

    // Runs until the WebSocket ended; returns the exit status.
    int run(asio::io_context& ioc)
    {
        ws_.binary(true);
        read_socket();
        if (!options_.read_only) {
            const int fd = ::dup(STDIN_FILENO);
            error_code ec;
            if (fd >= 0) {
                input_.assign(fd, ec); // a regular file or /dev/null cannot be polled: no input
                if (ec) {
                    ::close(fd);
                } else {
                    read_input();
                }
            }
        }
        signals_.async_wait([this](error_code ec, int signo) {
            if (!ec) {
                signal_ = signo;
                leave();
            }
        });
        ioc.restart();
        while (!ended_) {
            ioc.run_one();
        }
        error_code ignored;
        signals_.cancel(ignored);
        input_.close(ignored);
        close_timer_.cancel();
        ioc.restart();
        ioc.poll(); // the cancelled handlers, before their objects go
        return status();
    }

    // Why it ended, for stderr ("" when the user left).
    std::string message() const { return message_; }

private:
    int status()
    {
        if (signal_ == SIGTERM || signal_ == SIGHUP) {
            return 128 + signal_;
        }
        return status_;
    }

    void read_socket()
    {
        ws_.async_read(in_, [this](error_code ec, std::size_t) {
            if (ec) {
                finish(ec);
                return;
            }
            const std::string bytes = beast::buffers_to_string(in_.data());
            in_.consume(in_.size());
            if (ws_.got_text()) {
                // A notice from qmachined ({"lost": N, "offset": M}): told, not shown as output.
                if (options_.banner) {
                    std::string line = "[qmachined: " + bytes + "]";
                    line += raw_ ? "\r\n" : "\n";
                    write_all(STDERR_FILENO, line);
                }
            } else if (!write_all(STDOUT_FILENO, bytes)) {
                leave();
            }
            read_socket();
        });
    }

    void read_input()
    {
        input_.async_read_some(asio::buffer(input_buffer_), [this](error_code ec, std::size_t n) {
            if (ec) {
                // EOF or an error on stdin: nothing more to send; the output goes on.
                return;
            }
            std::string_view bytes(input_buffer_.data(), n);
            bool escape = false;
            if (options_.escape != '\0') {
                const auto at = bytes.find(options_.escape);
                if (at != std::string_view::npos) {
                    bytes = bytes.substr(0, at);
                    escape = true;
                }
            }
            if (bytes.empty()) {
                if (escape) {
                    leave();
                } else {
                    read_input();
                }
                return;
            }
            pending_ = std::string(bytes);
            writing_ = true;
            ws_.async_write(asio::buffer(pending_), [this, escape](error_code wec, std::size_t) {
                writing_ = false;
                if (wec) {
                    finish(wec);
                    return;
                }
                if (escape || leaving_) {
                    leave();
                } else {
                    read_input();
                }
            });
        });
    }

    // The user leaves: the closing handshake (1000), once no write is in progress.
    void leave()
    {
        leaving_ = true;
        if (writing_ || closing_ || ended_) {
            return;
        }
        closing_ = true;
        error_code ignored;
        input_.cancel(ignored);
        ws_.async_close(websocket::close_code::normal, [](error_code) {});
        // The daemon answers the close at once; do not wait on it for ever.
        close_timer_.expires_after(std::chrono::seconds(2));
        close_timer_.async_wait([this](error_code ec) {
            if (!ec && !ended_) {
                error_code ignored2;
                ws_.next_layer().close(ignored2);
            }
        });
    }

    void finish(const error_code& ec)
    {
        if (ended_) {
            return;
        }
        ended_ = true;
        if (closing_) {
            status_ = 0; // we left
            return;
        }
        const auto code = ws_.reason().code;
        const std::string reason(ws_.reason().reason.data(), ws_.reason().reason.size());
        if (ec == websocket::error::closed &&
            (code == websocket::close_code::normal || code == websocket::close_code::going_away)) {
            status_ = 0;
            message_ = reason.empty() ? "the console closed" : reason;
        } else if (ec == websocket::error::closed) {
            status_ = 1;
            message_ = fmt::format("the console closed ({}{}{})", code, reason.empty() ? "" : ": ",
                                   reason);
        } else {
            status_ = 1;
            message_ = "lost the console: " + ec.message();
        }
    }

    WebSocket& ws_;
    const ConsoleOptions& options_;
    bool raw_;
    asio::signal_set& signals_;
    asio::posix::stream_descriptor input_;
    asio::steady_timer close_timer_;
    beast::flat_buffer in_;
    std::array<char, 4096> input_buffer_{};
    std::string pending_; // the message being written
    bool writing_ = false;
    bool leaving_ = false;
    bool closing_ = false;
    bool ended_ = false;
    int signal_ = 0;
    int status_ = 0;
    std::string message_;
};

} // namespace

int run_console(Client& client, const ConsoleOptions& options)
{
    std::string target = "/v1/machines/" + options.machine + "/console";
    if (!options.read_only) {
        target += "?mode=write";
    }
    Response refused;
    auto ws = client.websocket(target, refused);
    if (!ws) {
        std::fprintf(stderr, "qmachinectl: %s\n", ws.error().message.c_str());
        return 3;
    }
    if (!*ws) {
        std::fprintf(stderr, "Failed to attach to the console of '%s': %s\n",
                     options.machine.c_str(), problem_detail(refused).c_str());
        return 1;
    }
    std::string message;
    int status = 0;
    bool raw = false;
    {
        // The signals are ours before the terminal goes raw: a SIGTERM from now on ends the
        // session through the guard's restore, never with the default action.
        asio::signal_set signals(client.io(), SIGINT, SIGTERM, SIGHUP);
        const bool interactive = !options.read_only && ::isatty(STDIN_FILENO) == 1;
        const TerminalGuard terminal(interactive);
        raw = terminal.raw();
        if (options.banner) {
            std::string hello = fmt::format("Connected to the console of '{}'{}.", options.machine,
                                            options.read_only ? " (read-only)" : "");
            if (options.escape != '\0' && !options.read_only) {
                hello += fmt::format(" Escape character is '{}'.", escape_name(options.escape));
            } else {
                hello += " Ctrl-C leaves.";
            }
            hello += raw ? "\r\n" : "\n";
            write_all(STDERR_FILENO, hello);
        }
        Session session(client.io(), **ws, options, raw, signals);
        status = session.run(client.io());
        message = session.message();
    }
    if (options.banner) {
        std::fprintf(stderr, "\n%s\n",
                     message.empty() ? "Disconnected."
                                     : ("Disconnected: " + message + ".").c_str());
    }
    return status;
}

} // namespace qm::ctl
