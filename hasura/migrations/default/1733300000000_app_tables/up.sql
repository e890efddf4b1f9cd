-- The app tables fusionsync keeps in agreement with FusionAuth (the default schema).
create table public.users (
    id uuid primary key default gen_random_uuid(),   -- also the FusionAuth user id
    email text unique,
    username text unique,
    first_name text,
    last_name text,
    active boolean not null default true,
    data jsonb not null default '{}',
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);

create table public.organizations (
    id uuid primary key default gen_random_uuid(),   -- also the FusionAuth group id
    name text not null,
    slug text unique,
    data jsonb not null default '{}',
    created_at timestamptz not null default now()
);

create table public.organization_members (
    organization_id uuid not null references public.organizations (id) on delete cascade,
    user_id uuid not null references public.users (id) on delete cascade,
    role text not null default 'member',
    primary key (organization_id, user_id)
);
create index organization_members_user_idx on public.organization_members (user_id);
